"""Metrics, bootstrap intervals, the zero-shot benchmarks and image-report retrieval."""
