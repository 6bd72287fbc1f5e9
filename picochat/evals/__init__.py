"""Evaluation: bits per byte (bpb.py), CORE for base models (core.py, with the offline subset in
core_offline.py) and chat evals with ChatCORE (chat_eval.py). docs/DESIGN.md#evaluation says what each measures."""
