"""CPU stand-ins for the CUDA-only calls of NeMo 2.7.3 / megatron-core 0.15.3 / ModelOpt, for the CPU test of
the nemo backend only: the product never imports this. Python loads it at start-up when this folder is on
PYTHONPATH, so every process of a test run (stage jobs, checkpoint writers) gets the same stand-ins.

Each stand-in first checks that the library code it stands in for still holds the CUDA call it was written for,
so a version bump fails loudly here instead of silently testing something else.
"""

from __future__ import annotations

import os

if os.environ.get("QATFLOW_NEMO_CPU_SHIMS") == "1":
    from nemo_cpu_shims import install

    install()
