"""Triton kernels of fastprompt (installed as `fastprompt.kernels`).

Importing this package registers the `triton` backend's implementations with fastprompt.backends.
Set TRITON_INTERPRET=1 before import to run them on CPU tensors (slow; for tests).
No kernel is registered yet: the ops' `triton` backend reports itself as not implemented.
"""
