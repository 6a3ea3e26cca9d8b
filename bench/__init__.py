"""Benchmarks for gwyh_mp: run as `python -m bench <command>`."""
