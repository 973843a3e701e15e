"""Naive baselines for the benchmark, clearly labelled: what a user writes first. Not rnnserve."""
