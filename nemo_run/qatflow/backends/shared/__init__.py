"""What both backends use: loading and saving Hugging Face models and tokenizers (modeling), the import of a
source model to a Hugging Face checkpoint (hf_import), quantizer helpers (quantizers) and the export's finishing
touches (checkpoint). Neither backend imports the other."""
