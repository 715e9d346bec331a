"""Benchmarks (not tests): python bench/replay.py, python bench/startup.py."""
