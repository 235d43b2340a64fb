"""Tests of observability/: real Prometheus, metric names, and traces across processes."""
