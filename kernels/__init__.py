"""Triton kernels behind nest_fast's "fast" backend (installed as ``nest_fast.kernels``).

One op, one file: each holds its Triton kernels, its autograd Function and the ``*_fast`` entry
point that ``nest_fast.backend`` dispatches to. Importing this package does not import Triton.
"""
