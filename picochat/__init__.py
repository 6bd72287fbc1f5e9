"""picochat: train your own small ChatGPT end to end, from a laptop CPU to a multi-node GPU cluster."""
__version__ = "0.1.0"
