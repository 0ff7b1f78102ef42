"""Triton kernels of ospo_fast, installed as ``ospo_fast.kernels``. Importing a kernel module imports triton;
callers reach kernels through ``ospo_fast.ops``, which picks the backend."""
