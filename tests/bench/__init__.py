"""The benchmark harness's smoke run: `bench/run.py --quick` must keep working."""
