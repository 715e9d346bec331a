"""Benchmarks (not tests): bench/replay.py, replay_stages.py, fleet.py, startup.py, live.py."""
