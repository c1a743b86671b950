"""Plain-PyTorch definitions of every statistic (SPEC.md), float64-capable.

These are the definitions every backend is tested against; they favour clarity over speed and
allocate freely. Call them with float64 inputs to get the exact value of a statistic.
"""
