"""
Training throughput of one base_train optimizer step on this machine: tok/s, MFU and peak RSS.

    python benchmarks/train_throughput.py                      # d4, batch 32 x 512, fp32 and auto dtype
    python benchmarks/train_throughput.py --steps 10 --depth 4 --dtypes float32,auto

A step is exactly base_train's loop body with random tokens instead of the loader: trunk forward,
the fused head loss, backward, MuonAdamW step (model.setup_optimizer()), zero_grad. Each (dtype,
path) runs in a fresh subprocess so peak RSS (VmHWM) is that run's alone. Two paths:
  fast       what picochat trains with: the fused autograd Functions in picochat/model.py, the fused
             head loss, and common.tune_cpu_allocator();
  reference  the plain, obviously-correct ops (reference_norm, reference_rotary_norm,
             reference_relu_squared, reference_head_loss) and the default allocator.
tok/s is from the median step time after --warmup steps. MFU divides model FLOPs
(model.flops_per_token()) by the measured matmul peak of this CPU in that dtype (common.peak_flops).
Results and history: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PATHS = ("reference", "fast")


def peak_rss_gib() -> float:
    """The process's peak resident set (VmHWM), in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args) -> dict:
    """One run in this (fresh) process; returns a dict of results."""
    from picochat import common
    if args.path == "fast":
        common.tune_cpu_allocator()
    import torch
    import picochat.model as M
    from picochat import ops
    from picochat.model import GPT, config_from_depth

    if args.path == "reference":  # the model looks these up at call time
        for name in ("norm", "rotary_norm", "relu_squared"):
            setattr(M, name, getattr(ops, f"reference_{name}"))
    loss_fn = ops.head_loss if args.path == "fast" else ops.reference_head_loss

    device = torch.device("cpu")
    dtype = common.resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    from picochat.recipe import ADAM_GROUPS, TRAINING, model_parts
    parts = model_parts(args.recipe, args.seq_len)
    model = GPT(config_from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len, **parts),
                compute_dtype=dtype)
    model.init_weights(seed=0)
    r = TRAINING[args.recipe]  # the recipe's Muon (orthogonalization, NorMuon, MuonEq, decay) and AdamW groups
    muon = dict(ortho=r["ortho"], normuon=r["normuon"] == "yes", row_equilibrate=r["row-equilibrate"] == "yes",
                weight_decay=0.1 if r["muon-weight-decay"] else 0.0)
    optimizer = model.setup_optimizer(adam=ADAM_GROUPS[args.recipe], muon=muon)
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, args.vocab_size, (B, T))
    y = torch.randint(0, args.vocab_size, (B, T))
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = loss_fn(model.trunk(x), model.lm_head.weight, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[args.warmup:])
    tok_per_sec = B * T / dt
    peak = common.peak_flops(device, dtype)
    return {"dtype": str(dtype).replace("torch.", ""), "path": args.path, "recipe": args.recipe, "tok_per_sec": tok_per_sec,
            "step_ms": 1000 * dt, "min_step_ms": 1000 * min(times[args.warmup:]),
            "mfu": model.flops_per_token() * tok_per_sec / peak, "peak_tflops": peak / 1e12,
            "peak_rss_gib": peak_rss_gib(), "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="device batch = one optimizer step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--dtypes", default="float32,auto", help="comma-separated: float32, bfloat16, auto")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated: reference, fast")
    p.add_argument("--recipes", default="seed", help="comma-separated: seed, 2026 (picochat/recipe.py: the "
                   "model parts and Muon options of each); the ratio column compares each to the first")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole table, alternating, this many times")
    p.add_argument("--recipe", default="seed", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--path", default="fast", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    print(f"d{args.depth}, vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len} = "
          f"{args.batch_size * args.seq_len:,} tokens per step, median of {args.steps} steps after "
          f"{args.warmup} warm-up; one fresh process per row")
    header = (f"{'recipe':<7} {'dtype':<9} {'path':<10} {'tok/s':>8} {'step ms':>8} {'MFU':>6} {'peak RSS':>9} "
              f"{'fast/ref':>9} {'/first':>7}")
    print(header)
    print("-" * len(header))
    for _ in range(args.rounds):
        for dtype in args.dtypes.split(","):
            first = {}
            for recipe in args.recipes.split(","):
                ref_tps = None
                for path in args.paths.split(","):
                    cmd = [sys.executable, __file__, "--worker", "--dtype", dtype, "--path", path,
                           "--depth", str(args.depth), "--vocab-size", str(args.vocab_size),
                           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                           "--steps", str(args.steps), "--warmup", str(args.warmup), "--recipe", recipe]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        sys.stderr.write(out.stderr)
                        return out.returncode
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    ref_tps = r["tok_per_sec"] if path == "reference" else ref_tps
                    ratio = f"{r['tok_per_sec'] / ref_tps:.2f}x" if ref_tps and path != "reference" else ""
                    first.setdefault(path, r["tok_per_sec"])
                    vs_first = f"{r['tok_per_sec'] / first[path]:.2f}x"
                    label = r["dtype"] + ("*" if dtype == "auto" else "")
                    print(f"{recipe:<7} {label:<9} {path:<10} {r['tok_per_sec']:>8,.0f} {r['step_ms']:>8.0f} "
                          f"{100 * r['mfu']:>5.1f}% {r['peak_rss_gib']:>6.2f} GiB {ratio:>9} {vs_first:>7}", flush=True)
    print("* picochat's default dtype here (common.resolve_dtype('auto')). "
          "MFU against this CPU's measured matmul peak in that dtype.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
