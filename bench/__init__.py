"""Benchmarks: each writes bench/results/NAME.json; bench/README.md summarizes them."""
