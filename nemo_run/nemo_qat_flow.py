#!/usr/bin/env python3
"""NVFP4 QAT / QAD of a Hugging Face LLM as a nemo_run experiment.

    python nemo_run/nemo_qat_flow.py --distill            # from the repository root
    python nemo_qat_flow.py --distill                     # from inside nemo_run/

All logic lives in the `qatflow` package beside this file; see `--help`.
"""

import os
import sys

# Importable without installation too. This folder must never hold an __init__.py: it would shadow
# the nemo_run library.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":  # nemo_run may import the driver inside jobs: never launch from an import
    from qatflow.cli import main

    sys.exit(main())
