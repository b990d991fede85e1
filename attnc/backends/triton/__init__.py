"""The Triton backend: host-side preparation (host.py) and the kernel launch (launch.py)."""
