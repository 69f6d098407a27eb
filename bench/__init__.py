"""Benchmark scripts; ``bench/report.py`` writes BENCHMARKS.md from their JSON output."""
