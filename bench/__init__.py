"""filewatch benchmarks: real processes on loopback, figures from one run.

`python bench/run.py` runs every scenario; see bench/run.py for the options.
"""
