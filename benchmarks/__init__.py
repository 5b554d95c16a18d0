"""Benchmarks: seconds per epoch per architecture, data throughput, the scale to 314k galaxies."""
