"""Triton kernels of fastprompt (installed as `fastprompt.kernels`): the `triton` backend.

kernels/<op>.py implements the op declared in fastprompt/ops/<op>.py: its kernels, their launchers, and one call
that makes the launchers the raw ops fastprompt::<op>_{fwd,bwd}_triton (`implement` of kernels/_common.py).
fastprompt.backends imports a module the first time its op is asked of the triton backend. Set
TRITON_INTERPRET=1 before the import to run the kernels on CPU tensors (slow, for tests).
"""
