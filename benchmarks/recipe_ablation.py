"""
Ablations of the 2026 recipe: base_train runs that differ in one part, at equal training FLOPs, on
the same data, each evaluated on every held-out document once. Prints one table row per variant:
val bpb, the difference from the first variant, tok/s, peak RSS, and the run's FLOPs.

    python benchmarks/recipe_ablation.py --depth 4 --flops-steps 100 \\
        --variant seed="--recipe seed" --variant 2026="--recipe 2026" \\
        --variant "no windows=--recipe 2026 --window-pattern L"

The FLOPs budget is what the first variant spends in --flops-steps steps; every other variant
gets --target-flops of the same amount (a windowed model takes more steps). Needs the demo corpus
and tokenizer in $PICOCHAT_HOME (picochat data demo; picochat tok_train --dataset demo).
Run it on an idle machine when the tok/s column matters.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run(name: str, flags: list[str], common: list[str], home: Path, tag: str) -> dict:
    cmd = [sys.executable, "-m", "picochat", "base_train", *common, *flags, "--model-tag", tag]
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: base_train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    out = proc.stdout + proc.stderr
    records = [json.loads(line) for line in (home / "checkpoints" / "base" / tag / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tok_per_sec" in r]
    flops = float(re.search(r"training FLOPs\s+([\d.e+]+)", out).group(1))
    return {"name": name, "val_bpb": [r for r in records if "val_bpb" in r][-1]["val_bpb"],
            "tok_per_sec": sorted(r["tok_per_sec"] for r in train[1:])[len(train[1:]) // 2] if len(train) > 1 else 0.0,
            "peak_rss_mib": int(re.search(r"MAXRSS (\d+)", out).group(1)) / 1024, "flops": flops,
            "steps": len(train), "wall_s": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="model depth of every variant")
    p.add_argument("--flops-steps", type=int, default=100, help="steps of the first variant that set the FLOPs budget")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--total-batch", type=int, default=16384, help="tokens per step")
    p.add_argument("--eval-tokens", type=int, default=163840, help="val tokens (the demo's val split is ~140K: all of it)")
    p.add_argument("--dataset", default="demo", help="dataset under $PICOCHAT_HOME/data")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--seed", type=int, default=42, help="init seed of every variant")
    p.add_argument("--variant", action="append", required=True, help="NAME=FLAGS (base_train flags); the first sets the budget")
    p.add_argument("--out", default="", help="append each result as a JSON line to this file")
    args = p.parse_args()
    import os
    home = Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat"))
    common = ["--dataset", args.dataset, "--depth", str(args.depth), "--max-seq-len", str(args.seq_len),
              "--device-batch-size", str(min(32, args.total_batch // args.seq_len)),
              "--total-batch-size", str(args.total_batch), "--eval-every", "-1", "--eval-tokens", str(args.eval_tokens),
              "--sample-every", "-1", "--dtype", args.dtype, "--seed", str(args.seed)]
    results, budget = [], None
    stamp = time.strftime("%H%M%S")
    for i, spec in enumerate(args.variant):
        name, _, flags = spec.partition("=")
        horizon = ["--num-iterations", str(args.flops_steps)] if budget is None else ["--target-flops", f"{budget:.6e}"]
        r = run(name, shlex.split(flags) + horizon, common, home, f"abl-{stamp}-{i}")
        budget = budget or r["flops"]
        results.append(r)
        base = results[0]["val_bpb"]
        print(f"{name:<28} bpb {r['val_bpb']:.4f} ({r['val_bpb'] - base:+.4f}, {100 * (r['val_bpb'] / base - 1):+.2f}%) "
              f"| {r['tok_per_sec']:,.0f} tok/s | peak {r['peak_rss_mib']:,.0f} MiB | {r['steps']} steps | "
              f"{r['flops']:.3e} FLOPs | {r['wall_s']:.0f}s", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**r, "depth": args.depth, "flags": flags, "seed": args.seed}) + "\n")


if __name__ == "__main__":
    main()
