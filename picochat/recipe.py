"""
The two training recipes, side by side: every value that differs between them, in one place.

- "seed": nanochat's recipe of 2025, as the seed document describes it (full attention in every
  layer, plain residuals, Muon with Newton-Schulz, a fixed 0.5M-token batch, 20 tokens per
  parameter). Its d20 table stays reproducible with `--recipe seed`.
- "2026": the parts nanochat's leaderboard adopted after it (docs/DESIGN.md#the-2026-recipe),
  each measured upstream on GPUs at d12-d26, each an ablation on this project's CPU
  (docs/LOG.md): sliding windows (SSSL), value embeddings, per-layer lambdas, smear and backout,
  RoPE base 100K, q·k sharpened by 1.2², the 2026 init; and the optimizer and horizon changes
  below.

base_train reads a recipe's values as the defaults of its flags, so every part can be switched on
or off alone (`--value-embeds no`, `--window-pattern L`, ...).
"""
from __future__ import annotations

RECIPES = ("seed", "2026")
WARMUP_STEPS, WARMUP_MAX_FRACTION = 40, 0.02


def warmup_steps(requested: int, num_iterations: int) -> int:
    """--warmup-steps, or for -1 the 2026 recipe's: 40 steps, at most 2% of the run."""
    return requested if requested >= 0 else min(WARMUP_STEPS, int(num_iterations * WARMUP_MAX_FRACTION))


def short_window(seq_len: int) -> int:
    """The window of an S layer: a quarter of the context (512 of 2048, 128 of 512)."""
    return max(1, seq_len // 4)


def model_parts(recipe: str, seq_len: int) -> dict:
    """GPTConfig's 2026 fields for a recipe (the seed's are the dataclass defaults)."""
    if recipe == "seed":
        return dict(window_pattern="L", short_window=0, value_embeds=False, lambdas=False, smear=False,
                    backout=False, rope_base=10_000.0, qk_scale=1.0, init="seed")
    if recipe == "2026":
        return dict(window_pattern="SSSL", short_window=short_window(seq_len), value_embeds=True,
                    lambdas=True, smear=True, backout=True, rope_base=100_000.0, qk_scale=1.2, init="2026")
    raise ValueError(f"unknown recipe {recipe!r}; the recipes are {', '.join(RECIPES)}")


# base_train's flags whose defaults come from the recipe (flag name with dashes -> value).
# warmup-steps -1: nanochat HEAD's 40 steps, but at most 2% of the run (its GPU horizons are 2,500+
# steps, where this is 40; on a 113-step CPU run 40 steps of warmup cost 5% bpb, docs/LOG.md).
TRAINING = {
    "seed": {
        "embedding-lr": 0.2, "unembedding-lr": 0.004, "matrix-lr": 0.02, "scalar-lr": 0.5,
        "weight-decay": 0.0, "muon-weight-decay": 0.0, "ortho": "newton_schulz", "normuon": "no",
        "row-equilibrate": "no", "warmup-steps": 0, "warmdown-ratio": 0.2, "final-lr-frac": 0.0,
        "momentum-schedule": "seed", "batch-lr-scale": "no", "target-param-data-ratio": 20.0,
        "horizon-params": "all", "total-batch-size": 524288,
    },
    "2026": {
        "embedding-lr": 0.3, "unembedding-lr": 0.008, "matrix-lr": 0.02, "scalar-lr": 0.5,
        "weight-decay": 0.0, "muon-weight-decay": -1.0, "ortho": "polar_express", "normuon": "yes",
        "row-equilibrate": "yes", "warmup-steps": -1, "warmdown-ratio": 0.65, "final-lr-frac": 0.05,
        "momentum-schedule": "2026", "batch-lr-scale": "auto", "target-param-data-ratio": 12.0,
        "horizon-params": "scaling", "total-batch-size": -1,
    },
}

# AdamW settings of the head and the embedding that differ from the defaults (betas (0.8, 0.95),
# the --weight-decay flag's decay).
ADAM_GROUPS = {
    "seed": {},
    "2026": {"lm_head": {"betas": (0.8, 0.96), "weight_decay": 0.01},
             "wte": {"betas": (0.8, 0.995), "weight_decay": 0.001}},
}

MODEL_FLAGS = {  # flag -> GPTConfig field, for the 2026 parts
    "window-pattern": "window_pattern", "short-window": "short_window", "value-embeds": "value_embeds",
    "lambdas": "lambdas", "smear": "smear", "backout": "backout", "rope-base": "rope_base",
    "qk-scale": "qk_scale", "init": "init",
}


def horizon(config, ratio: float, counted: str, total_batch: int) -> tuple[float, float, int]:
    """The horizon rules base_train and the presets share, for a model of `config`: (tokens the
    ratio asks for, the same recipe's d12 reference tokens, the total batch). `counted`: "all"
    parameters or the "scaling" ones (block matrices plus head); total_batch -1: from the horizon,
    B = 2^round(log2(2^19·(D/D_d12)^0.383))."""
    import dataclasses

    import torch

    from picochat.model import GPT, config_from_depth
    from picochat.training import auto_total_batch
    count = (lambda m: m.num_params()) if counted == "all" else (lambda m: m.scaling_params())
    ref_config = config_from_depth(12, config.vocab_size, config.sequence_len,
                                   **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                      if f.name in model_parts("seed", 1)})
    with torch.device("meta"):
        tokens, ref_tokens = ratio * count(GPT(config)), ratio * count(GPT(ref_config))
    if total_batch == -1:
        if ratio <= 0:
            raise ValueError("a batch from the horizon (--total-batch-size -1) needs a positive "
                             "--target-param-data-ratio")
        total_batch = auto_total_batch(tokens, ref_tokens)
    return tokens, ref_tokens, total_batch
