"""Benchmarks: the load generator (`tgq bench`), the one-at-a-time baseline worker and the suite."""
