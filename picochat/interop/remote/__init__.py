"""
The transformers model files `picochat export` copies into an export whose model has parts
transformers' own NanoChat class lacks (sliding windows, value embeddings, lambdas, smear, backout,
another RoPE base or q·k scale). They import torch and transformers only, never picochat: they run
on the machine of whoever loads the export, with `trust_remote_code=True`.
"""
