"""
Evaluate a base checkpoint: bits per byte on the train and val splits, and samples.

    picochat base_eval --dataset demo                 # the only base model, its latest step
    torchrun --nproc_per_node=8 -m picochat base_eval --model-tag d20

Results are printed and written to $PICOCHAT_HOME/evals/base_<tag>_step<N>.json.
"""
from __future__ import annotations

import json


from picochat.checkpoint import load_model
from picochat.cli import Parser, add_device_args
from picochat.common import (atomic_write_text, picochat_home, print0, resolve_dtype, setup_device,
                             shutdown_distributed)
from picochat.data.loader import PackingLoader
from picochat.engine import Engine
from picochat.evals.bpb import evaluate_bpb
from picochat.stages.base_train import SAMPLE_PROMPTS


def build_parser() -> Parser:
    p = Parser("base_eval", "Evaluate a base model: train/val bits per byte and text samples.")
    p.add_argument("--dataset", default="fineweb-edu", help="dataset whose train and val splits are scored")
    p.add_argument("--model-tag", default="", help="checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens scored per split")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sample")
    p.add_argument("--num-unconditioned", type=int, default=4,
                   help="samples from just <|bos|> at temperature 1.0")
    add_device_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    info, device = setup_device(args.device)
    try:
        return evaluate(args, info, device)
    finally:
        shutdown_distributed()


def evaluate(args, info, device):
    from picochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    dtype = resolve_dtype(args.dtype, device)
    model, meta = load_model("base", args.model_tag or None, device,
                             step=None if args.step < 0 else args.step, compute_dtype=dtype)
    if model.config.vocab_size != tokenizer.vocab_size:
        from picochat.common import PicochatError
        raise PicochatError(f"the model has vocab {model.config.vocab_size} but the tokenizer "
                            f"{tokenizer.vocab_size}; was the tokenizer retrained after training?")
    token_bytes = tokenizer.token_bytes().to(device)
    T, B, W = model.config.sequence_len, args.device_batch_size, info.world_size
    tag, step = meta["user_config"].get("model_tag") or f"d{model.config.n_layer}", meta["step"]
    print0(f"base model {tag} step {step}: {model.num_params():,} parameters, dtype {dtype}")

    results = {"model_tag": tag, "step": step, "dataset": args.dataset}
    steps = max(1, args.eval_tokens // (B * T * W))
    for split in ("train", "val"):
        loader = PackingLoader(args.dataset, split, tokenizer, B, T, stream=info.rank, num_streams=W,
                               buffer_docs=100, device=device)
        bpb = evaluate_bpb(lambda x, y: model(x, y, loss_reduction="none"), loader.one_pass(steps), token_bytes)
        results[f"{split}_bpb"] = bpb
        print0(f"{split} bpb: {bpb:.4f}  ({loader.total_tokens:,} tokens on rank 0; at most one pass over the split)")

    if info.is_master:
        samples, engine = {}, Engine(model, tokenizer)
        print0("samples (greedy):")
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
            out = engine.generate_batch(ids, max_tokens=args.max_new_tokens, temperature=0.0)[0][0][len(ids):]
            text = tokenizer.decode(out)
            samples[prompt] = text
            print0(f"  {prompt}{text}")
        print0("samples (unconditioned, temperature 1.0):")
        unconditioned = []
        for i in range(args.num_unconditioned):
            out = engine.generate_batch([tokenizer.bos_id], max_tokens=args.max_new_tokens * 2,
                                        temperature=1.0, seed=i)[0][0][1:]
            unconditioned.append(tokenizer.decode(out))
            print0(f"  [{i}] {unconditioned[-1]!r}")
        results["samples"] = samples
        results["unconditioned_samples"] = unconditioned
        out = picochat_home() / "evals" / f"base_{tag}_step{step:06d}.json"
        atomic_write_text(out, json.dumps(results, indent=2))
        print0(f"wrote {out}")
    return 0
