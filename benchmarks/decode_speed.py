"""
Decode speed of the inference engine: tok/s, ms per step and time to first token, for batch 1, 8 and
32, fp32 and bf16, d4 and d8 (random models: vocab 4,096, context 1,024, heads of 64; a 32-token
prompt, 200 greedy tokens, median of 3 rounds). The fast path is picochat.scheduler.generate on a
model after prepare_for_inference (picochat/decode.py); with --compile, its decode step compiled
(picochat.decode.CompiledDecode: CUDA graphs on CUDA). Each configuration is timed in the same run,
alternating, against a reference, so the ratio holds on a shared machine too:

- by default the plain eager loop (picochat.engine.reference_generate: the model's training
  forward over the whole sequence for every token, fp32 master weights cast in every Linear call);
- with --against DIR, the fast path of another checkout of picochat (e.g. `git worktree add
  /tmp/old REV`), each round of each side in a fresh process (`--worker`), so two versions are
  compared on the same machine minutes apart.

Greedy tokens of the two are compared ("same"; required in fp32).

    python benchmarks/decode_speed.py                           # the full table (a few minutes)
    python benchmarks/decode_speed.py --depths 4 --batches 1 8 --dtypes float32
    python benchmarks/decode_speed.py --depths 4 --batches 1 8 --against /tmp/old
    python benchmarks/decode_speed.py --device cuda --compile

Results in docs/BENCHMARKS.md#decode-speed-benchmarksdecode_speedpy.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

if "--worker" in sys.argv:  # import picochat from the checkout being measured
    sys.path.insert(0, sys.argv[sys.argv.index("--worker") + 1])

from picochat.engine import Engine, compile_decode, reference_generate  # noqa: E402
from picochat.model import GPT, config_from_depth  # noqa: E402

try:
    from picochat.scheduler import generate
except ImportError:  # a checkout from before the one decode loop: Engine.generate
    def generate(engine, *args, **kwargs):
        return engine.generate(*args, **kwargs)


class NoTools:
    """A tokenizer stand-in whose special tokens the model never emits: every row runs 200 steps."""
    bos_id = 1 << 30

    def encode_special(self, name):
        return (1 << 30) + len(name)

    @property
    def special_ids(self):
        return {name: self.encode_special(name) for name in ("<|python_start|>", "<|assistant_end|>")}

    def id_to_bytes(self, token):
        return b"?"


def random_model(depth: int, device) -> GPT:
    config = config_from_depth(depth, vocab_size=4096, sequence_len=1024, head_dim=64)
    model = GPT(config).to(device)
    model.init_weights(seed=0)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():  # the head and output projections start at zero: make every layer count
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, device=device))
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fast(engine, prompt, batch, tokens, device):
    t0 = time.perf_counter()
    first, rows = None, []
    for column, _ in generate(engine, prompt, num_samples=batch, max_tokens=tokens, temperature=0.0):
        if first is None:
            sync(device)
            first = time.perf_counter() - t0
        rows.append(column)
    sync(device)
    total = time.perf_counter() - t0
    return total, first, [list(r) for r in zip(*rows)]


def time_reference(model, prompt, batch, tokens, device):
    t0 = time.perf_counter()
    reference_generate(model, prompt, batch, 1)  # time to first token: prefill + one argmax
    sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = reference_generate(model, prompt, batch, tokens)
    sync(device)
    return time.perf_counter() - t0, first, rows


def fast_engine(base: GPT, dtype, device, compile: bool) -> Engine:
    fast = copy.deepcopy(base)
    fast.compute_dtype = dtype
    fast.prepare_for_inference()
    engine = Engine(fast, NoTools(), compile=False)
    if compile:
        engine.compiled = compile_decode(device)
    return engine


def worker(args) -> None:
    """One fast-path measurement in this process (of the checkout on sys.path): a JSON line."""
    device = torch.device(args.device)
    engine = fast_engine(random_model(args.depths[0], device), getattr(torch, args.dtypes[0]), device, args.compile)
    prompt = make_prompt(args.prompt_len)
    time_fast(engine, prompt, args.batches[0], args.tokens, device)  # warm-up (compiles)
    total, first, rows = time_fast(engine, prompt, args.batches[0], args.tokens, device)
    print(json.dumps({"total": total, "first": first, "rows": rows}))


def in_process(code: str, args, depth: int, dtype_name: str, batch: int):
    """time_fast's (total, first, rows) for the checkout at `code`, in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", code, "--depths", str(depth), "--dtypes", dtype_name,
           "--batches", str(batch), "--tokens", str(args.tokens), "--prompt-len", str(args.prompt_len),
           "--device", args.device] + (["--threads", str(args.threads)] if args.threads else []) + \
        (["--compile"] if args.compile else [])
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    return out["total"], out["first"], out["rows"]


def make_prompt(length: int) -> list[int]:
    return torch.randint(2, 4096, (length,), generator=torch.Generator().manual_seed(0)).tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=200, help="greedy tokens per row (default: 200)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="rounds per variant; the median is shown")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="compile the fast decode step (CUDA graphs on CUDA)")
    p.add_argument("--against", default="", help="a checkout of picochat whose fast path is the reference "
                   "(default: the plain eager loop of this one)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    device = torch.device(args.device)
    prompt = make_prompt(args.prompt_len)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reference = f"the fast path of {args.against}" if args.against else "plain eager loop (per-call weight cast)"
    print(f"{args.device}, {torch.get_num_threads()} threads, {args.prompt_len}-token prompt, {args.tokens} "
          f"greedy tokens, median of {args.rounds}; ref = {reference}")
    print(f"{'depth':>5} {'dtype':>8} {'batch':>5} | {'ref tok/s':>9} {'ms/step':>7} {'TTFT ms':>7} | "
          f"{'fast tok/s':>10} {'ms/step':>7} {'TTFT ms':>7} | {'ratio':>5} same")
    for depth in args.depths:
        base = random_model(depth, device)
        if device.type == "cpu":  # what `picochat chat --dtype auto` would decode this model in here
            from picochat.decode import decode_dtype
            print(f"d{depth}: default decode dtype (decode.decode_dtype, measured): "
                  f"{str(decode_dtype(copy.deepcopy(base), 'auto', device)).removeprefix('torch.')}", flush=True)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            ref = copy.deepcopy(base)
            ref.compute_dtype = dtype  # fp32 masters: every Linear casts per call, as before
            engine = fast_engine(base, dtype, device, args.compile)
            for batch in args.batches:
                if args.against:  # each side in fresh processes, alternating
                    measure_ref = lambda: in_process(args.against, args, depth, dtype_name, batch)  # noqa: E731
                    measure_fast = lambda: in_process(here, args, depth, dtype_name, batch)  # noqa: E731
                else:
                    time_fast(engine, prompt, batch, args.tokens, device)  # warm-up (compiles)
                    time_reference(ref, prompt, batch, 8, device)
                    measure_ref = lambda: time_reference(ref, prompt, batch, args.tokens, device)  # noqa: E731
                    measure_fast = lambda: time_fast(engine, prompt, batch, args.tokens, device)  # noqa: E731
                runs = {"ref": [], "fast": []}
                for _ in range(args.rounds):  # alternate, so load changes hit both alike
                    runs["ref"].append(measure_ref())
                    runs["fast"].append(measure_fast())
                cells, rates = [], {}
                for name, results in runs.items():
                    total = statistics.median(r[0] for r in results)
                    first = statistics.median(r[1] for r in results)
                    rates[name] = batch * args.tokens / total
                    cells.append(f"{rates[name]:>9.0f} {1000 * (total - first) / (args.tokens - 1):>7.2f} "
                                 f"{1000 * first:>7.1f}")
                same = runs["ref"][0][2] == runs["fast"][0][2]
                print(f"{depth:>5} {dtype_name:>8} {batch:>5} | {cells[0]} | {cells[1]:>26} | "
                      f"{rates['fast'] / rates['ref']:>5.2f} {'yes' if same else 'no'}", flush=True)


if __name__ == "__main__":
    main()
