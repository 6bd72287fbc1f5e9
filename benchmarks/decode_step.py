"""
One decode step of the serving scheduler: every active row feeds one token against its KV cache.
Compares the CPU decode attention (model.decode_attention: two plain matmuls) with torch's
scaled_dot_product_attention, which the model used before, in the same run on the same cache.

    python benchmarks/decode_step.py                     # d4, 16 rows at 100-400 cached tokens
    python benchmarks/decode_step.py --depth 8 --rows 4 --dtype float32

Prints ms per step and the ratio; results in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import picochat.model as M
from picochat.model import GPT, RowKVCache, config_from_depth


def sdpa_decode(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="model depth (default: 4, the demo's)")
    p.add_argument("--rows", type=int, default=16, help="active rows (default: 16)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32 (default: bfloat16)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per variant (default: 50)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    config = config_from_depth(args.depth, vocab_size=4096, sequence_len=1024)
    model = GPT(config, compute_dtype=dtype)
    model.init_weights(seed=0)
    model.eval()
    cache = RowKVCache(config, args.rows, config.sequence_len, "cpu", dtype)
    cache.rows = args.rows
    g = torch.Generator().manual_seed(0)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    cache.lengths[:args.rows] = [100 + (300 * i) // max(1, args.rows - 1) for i in range(args.rows)]
    ids = torch.randint(0, 4096, (args.rows, 1), generator=g)
    results, fast_path = {}, M.decode_attention
    for name, attention in (("torch SDPA (before)", sdpa_decode), ("plain matmuls (decode_attention)", M.decode_attention)):
        M.decode_attention = attention  # the model looks the function up at call time
        lengths = list(cache.lengths)
        with torch.no_grad():
            for _ in range(5):  # warm-up
                model(ids, kv_cache=cache)
                cache.lengths[:] = lengths
            t0 = time.perf_counter()
            for _ in range(args.steps):
                model(ids, kv_cache=cache)
                cache.lengths[:] = lengths  # the same step again, not a growing cache
            results[name] = (time.perf_counter() - t0) / args.steps * 1000
    M.decode_attention = fast_path
    (ref_name, ref), (name, fast) = results.items()
    print(f"d{args.depth}, {args.rows} rows at 100-400 cached tokens, {args.dtype}, {torch.get_num_threads()} threads")
    print("| attention | ms per decode step | vs SDPA |\n|---|---:|---:|")
    print(f"| {ref_name} | {ref:.2f} | 1.00x |")
    print(f"| {name} | {fast:.2f} | {ref / fast:.2f}x |")


if __name__ == "__main__":
    main()
