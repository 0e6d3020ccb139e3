"""Compatibility for running the pinned megatron-core 0.15.3 under NumPy 2 (GPU images ship NumPy 2; our pins keep
NumPy < 2): its dist-checkpointing code calls `np.product`, which NumPy 2 removed. Put this folder on PYTHONPATH
only where NumPy 2 is installed; the product never imports it."""

import numpy

if not hasattr(numpy, "product"):
    numpy.product = numpy.prod
