"""Benchmarks: figures printed side by side with their references (``make bench``)."""
