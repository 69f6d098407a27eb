"""Benchmark scripts; ``bench/run_all.py`` writes BENCHMARKS.md from their JSON output."""
