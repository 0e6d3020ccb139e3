"""qatflow: NVFP4 quantization-aware training and distillation of Hugging Face LLMs with nemo_run."""

__version__ = "0.1.0"
