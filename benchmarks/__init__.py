"""merv.benchmarks."""
