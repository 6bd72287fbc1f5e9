"""Evaluation: bits per byte (and, later, CORE and chat evals)."""
