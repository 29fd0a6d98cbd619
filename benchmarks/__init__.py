"""Benchmarks that print their figures as JSON lines."""
