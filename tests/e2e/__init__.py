"""End-to-end tests: a real aggregator and real watchers, each its own process."""
