"""Load tests (Locust) and the benchmark harness: python -m loadtest run | bench."""
