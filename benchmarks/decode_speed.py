"""
Decode speed of the inference engine: tok/s, ms per step and time to first token, for batch 1, 8 and
32, fp32 and bf16, d4 and d8 (random models: vocab 4,096, context 1,024, heads of 64; a 32-token
prompt, 200 greedy tokens, median of 3 rounds). Each configuration is timed against the plain eager
loop (picochat.engine.reference_generate: the model's own forward with a KVCache, one step at a
time, fp32 master weights cast to the compute dtype in every Linear call, as the engine decoded
before) in the same run, alternating, so the ratio holds on a shared machine too. The fast path is
Engine.generate on a model after prepare_for_inference (GPT.decode_step); with --compile, its
decode step compiled (picochat.model.CompiledDecode: CUDA graphs on CUDA). Greedy tokens of the two
are compared in fp32 ("same").

    python benchmarks/decode_speed.py                           # the full table (a few minutes)
    python benchmarks/decode_speed.py --depths 4 --batches 1 8 --dtypes float32
    python benchmarks/decode_speed.py --device cuda --compile

Results in docs/BENCHMARKS.md#decode-speed-benchmarksdecode_speedpy.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from picochat.decode import decode_dtype
from picochat.engine import Engine, compile_decode, reference_generate
from picochat.model import GPT, config_from_depth


class NoTools:
    """A tokenizer stand-in whose special tokens the model never emits: every row runs 200 steps."""
    bos_id = 1 << 30

    def encode_special(self, name):
        return (1 << 30) + len(name)


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
    for column, _ in engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=0.0):
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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prompt = torch.randint(2, 4096, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"{args.device}, {torch.get_num_threads()} threads, {args.prompt_len}-token prompt, {args.tokens} "
          f"greedy tokens, median of {args.rounds}; ref = plain eager loop (per-call weight cast)")
    print(f"{'depth':>5} {'dtype':>8} {'batch':>5} | {'ref tok/s':>9} {'ms/step':>7} {'TTFT ms':>7} | "
          f"{'fast tok/s':>10} {'ms/step':>7} {'TTFT ms':>7} | {'ratio':>5} same")
    for depth in args.depths:
        base = random_model(depth, device)
        if device.type == "cpu":  # what `picochat chat --dtype auto` would decode this model in here
            print(f"d{depth}: default decode dtype (common.decode_dtype, measured): "
                  f"{str(decode_dtype(copy.deepcopy(base), 'auto', device)).removeprefix('torch.')}", flush=True)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            ref = copy.deepcopy(base)
            ref.compute_dtype = dtype  # fp32 masters: every Linear casts per call, as before
            fast = copy.deepcopy(base)
            fast.compute_dtype = dtype
            fast.prepare_for_inference()
            engine = Engine(fast, NoTools(), compile=False)
            if args.compile:
                engine.compiled = compile_decode(device)
            for batch in args.batches:
                time_fast(engine, prompt, batch, args.tokens, device)  # warm-up (compiles)
                time_reference(ref, prompt, batch, 8, device)
                runs = {"ref": [], "fast": []}
                for _ in range(args.rounds):  # alternate, so load changes hit both alike
                    runs["ref"].append(time_reference(ref, prompt, batch, args.tokens, device))
                    runs["fast"].append(time_fast(engine, prompt, batch, args.tokens, device))
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
