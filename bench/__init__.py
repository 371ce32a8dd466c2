"""Vajra benchmarks: `make bench` or `python -m bench`. Each prints JSON."""
