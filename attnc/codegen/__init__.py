"""IR -> Triton source, the on-disk cache of generated modules, and kernel launch."""
