"""Datasets and benchmarks as conversations: one file per task, plus mixtures (tasks/base.py)."""
