"""Benchmarks of attnc against its peers; not part of the test suite (see README.md)."""
