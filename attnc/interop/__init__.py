"""Bridges from compiled attnc specs to other attention APIs (flex.py: PyTorch FlexAttention)."""
