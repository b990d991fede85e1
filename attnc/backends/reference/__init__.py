"""The reference backend (the oracle): dense mask, dense attention, routing. Imported by tests
and by `backend="reference"` only."""
from .attention import dense_mask, reference_attention
from .routing import routed_mask

__all__ = ["dense_mask", "reference_attention", "routed_mask"]
