"""Triton kernels of tofa_fast (installed as ``tofa_fast.triton_kernels``).

Import the kernel modules lazily: Triton fixes interpreter vs compiler mode (``TRITON_INTERPRET``)
when a kernel is decorated, i.e. at import.
"""
