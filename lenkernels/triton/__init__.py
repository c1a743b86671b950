"""Triton kernels. On CPU tensors they run under ``TRITON_INTERPRET=1`` (set before import)."""
