"""Backends that run a compiled spec: `reference` (the dense oracle) and `triton` (generated kernels)."""
