"""Triton kernels of gelora, shipped as ``gelora.kernels`` (one operation per file)."""
