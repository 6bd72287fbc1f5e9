"""
The GPU presets of `make speedrun`, and what each will cost, printed before it starts:

    python -m picochat.presets d20                 # the plan under the 2026 recipe
    python -m picochat.presets d20 --recipe seed   # the seed's d20 (its ~4 h, ~$100 table)

| preset | hardware | recipe 2026 |
|---|---|---|
| d12  | one 24 GB consumer GPU | 12 tokens per scaling parameter, ClimbMix |
| d20  | 8×H100, the seed's $100 tier | 12 tokens per scaling parameter, ClimbMix |
| gpt2 | 8×H100, nanochat's time-to-GPT-2 target | d24 at 8 tokens per scaling parameter, ClimbMix |

The estimate builds the model on the meta device (no memory), takes the horizon and batch from the
same rules base_train uses (picochat.training), and divides the training FLOPs by the GPUs' bf16
peak at an assumed utilization (MFU). It is an estimate of the pretraining stage, which is most of
a run; the chat stages add roughly a tenth.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from picochat.recipe import RECIPES, TRAINING, model_parts


@dataclass(frozen=True)
class Hardware:
    name: str
    gpus: int
    peak_flops: float      # bf16 dense, per GPU
    mfu: float             # assumed model FLOPs utilization of a pretraining step
    dollars_per_hour: float  # the whole machine, on demand


H100_NODE = Hardware("8×H100 SXM", 8, 989e12, 0.45, 24.0)
CONSUMER_24GB = Hardware("1×RTX 4090 (24 GB)", 1, 165e12, 0.40, 0.40)


@dataclass(frozen=True)
class Preset:
    name: str
    depth: int
    hardware: Hardware
    ratio: float | None = None    # tokens per (scaling) parameter; None: the recipe's
    device_batch: int = 32
    max_seq_len: int = 2048


PRESETS = {
    "d12": Preset("d12", 12, CONSUMER_24GB, device_batch=8),
    "d20": Preset("d20", 20, H100_NODE),
    "gpt2": Preset("gpt2", 24, H100_NODE, ratio=8.0, device_batch=16),
}

# the tokenizer each recipe trains: the seed's 65,536 tokens, nanochat HEAD's 32,768
VOCAB = {"seed": 65536, "2026": 32768}
DATASET = {"seed": "fineweb-edu", "2026": "climbmix"}


def plan(preset: str, recipe: str = "2026") -> dict:
    """Model size, horizon, batch, FLOPs, hours and dollars of a preset's pretraining."""
    import torch

    from picochat.model import GPT, config_from_depth
    from picochat.recipe import horizon
    p, train = PRESETS[preset], TRAINING[recipe]
    ratio = p.ratio if p.ratio is not None else train["target-param-data-ratio"]
    config = config_from_depth(p.depth, VOCAB[recipe], p.max_seq_len, **model_parts(recipe, p.max_seq_len))
    tokens_wanted, _, batch = horizon(config, ratio, train["horizon-params"], train["total-batch-size"])
    with torch.device("meta"):
        model = GPT(config)
    steps = int(tokens_wanted // batch)
    flops = model.flops_per_token() * batch * steps
    hw = p.hardware
    seconds = flops / (hw.gpus * hw.peak_flops * hw.mfu)
    return dict(preset=preset, recipe=recipe, depth=p.depth, width=model.config.n_embd, params=model.num_params(),
                scaling_params=model.scaling_params(), ratio=ratio, total_batch=batch, steps=steps,
                tokens=steps * batch, flops=flops, hardware=hw.name, mfu=hw.mfu, hours=seconds / 3600,
                dollars=seconds / 3600 * hw.dollars_per_hour, vocab=VOCAB[recipe], dataset=DATASET[recipe],
                shards=shards_for(steps * batch), device_batch=p.device_batch)


def shards_for(tokens: float, chars_per_token: float = 4.8, chars_per_shard: float = 250e6) -> int:
    """Hub shards a run reads (each ~250M characters), with a tenth spare, at least 8."""
    return max(8, math.ceil(tokens * chars_per_token / chars_per_shard * 1.1))


def describe(e: dict) -> str:
    return (f"preset {e['preset']} ({e['recipe']} recipe): d{e['depth']}, width {e['width']}, "
            f"{e['params'] / 1e6:,.0f}M parameters ({e['scaling_params'] / 1e6:,.0f}M scaling), vocab {e['vocab']:,}, "
            f"{e['dataset']} ({e['shards']} shards)\n"
            f"  {e['steps']:,} steps × {e['total_batch']:,} tokens = {e['tokens'] / 1e9:.2f}B tokens "
            f"({e['ratio']:g} per {'scaling ' if e['recipe'] != 'seed' else ''}parameter), "
            f"{e['flops']:.2e} FLOPs\n"
            f"  estimate on {e['hardware']} at {100 * e['mfu']:.0f}% MFU: {e['hours']:.1f} h of pretraining, "
            f"~${e['dollars']:,.0f} (+ roughly a tenth for the chat stages)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m picochat.presets",
                                description="Print a GPU preset's model, horizon and estimated hours and dollars.")
    p.add_argument("preset", choices=sorted(PRESETS), help="the speedrun preset")
    p.add_argument("--recipe", choices=RECIPES, default="2026", help="training recipe (picochat/recipe.py)")
    p.add_argument("--field", default="", help="print only this field of the plan (for scripts)")
    args = p.parse_args(argv)
    e = plan(args.preset, args.recipe)
    print(e[args.field] if args.field else describe(e))


if __name__ == "__main__":
    main()
