"""
Validate a GPU machine for picochat in one command (meant to take under 8 minutes on one H100/H200):

    python3 benchmarks/gpu_check.py                        # everything, bf16 on cuda:0
    python3 benchmarks/gpu_check.py --depths 12            # skip the d20 training run
    python3 benchmarks/gpu_check.py --checks fused_ops,head_loss --out gpu_check.json
    python3 benchmarks/gpu_check.py --cpu-dry-run          # the same code paths, tiny, on this CPU

It needs only what a bare GPU box has: torch, tiktoken, pyarrow, numpy, tqdm (no rustbpe, no
fastapi, no network). The tokenizer and the dataset are synthetic and written into a temporary
PICOCHAT_HOME: 256 single bytes plus two-byte merges up to a 65,536-token vocabulary (picochat's own
tokenizer format, built without training) and parquet shards of random words, with a val shard.

The checks, in order (each one's failure is caught, so the others still run):
  fused_ops         norm, rotary_norm, relu_squared (the fused autograd Functions in picochat/model.py)
                    against their references, forward and input gradient, in bf16 at d20 shapes.
                    Pass: the fast path's error against an fp64 ground truth is at most twice the
                    bf16 reference's error plus one bf16 epsilon of the largest value.
  head_loss         the fused chunked head loss against reference_head_loss (loss, grad of x, grad
                    of the head weight) at several chunk sizes, each timed (forward + backward,
                    median of a few reps): the fastest chunk size for this device is printed.
                    --head-compiled also times head_loss(compiled=True), as base_train runs it.
  kv_cache          Engine's greedy decoding (2 rows, KV cache) against one full forward over the same
                    tokens, and the KV cache fed those tokens one at a time against the full forward's
                    logits. Pass: both rows agree, the logits agree within 16 bf16 epsilons of the
                    largest logit, and each greedy token is the full forward's argmax unless the two
                    are within rounding of a tie. Then batch-1 decode speed of the fast path, eager
                    and compiled (CUDA graphs), at d20: ms/step and the bandwidth it reaches against
                    the GPU's HBM peak (reported; fails only if the compiled step fell back to eager).
  sharded_optim     MuonAdamW under a 1-rank NCCL process group makes the same update as with no
                    process group, bit for bit, and NCCL's reduce, broadcast and all_reduce work.
  eval_memory       peak GPU memory of a val-bpb forward, model(x, y, loss_reduction="none") under
                    no_grad at batch 32 x 2048, d20, vocab 65,536. Pass: the extra memory is less
                    than the full fp32 logits would take (the head is evaluated in chunks).
  train_d20, ...    a real `python3 -m picochat base_train` per --depths for --steps steps: tok/s,
                    MFU, compile time (the first step's time), peak memory against base_train's own
                    printed memory estimate. Pass: it exits 0, prints the memory lines and the loss
                    falls.
  compile_vs_eager  the last depth's run again with --compile no: compiled / eager tok/s (reported,
                    not judged; passes when the eager run trains).
  resume            a small run with checkpoints, the same run SIGKILLed after its first checkpoint
                    and resumed: per-step losses in metrics.jsonl must match the uninterrupted
                    run's (bit for bit on the CPU; within 1e-3 on CUDA, where the embedding
                    backward's atomic adds already make two identical runs differ slightly).

It prints progress as it goes, one table at the end (check | result | numbers | pass/fail), and exits
1 if any check failed. --out FILE also writes the table and every raw number as JSON.

--cpu-dry-run runs every check's code path here, small: depth 2, vocab 512, 64-token rows,
4 steps, gloo instead of NCCL, nothing compiled, no GPU memory statistics. tests/test_gpu_check.py
runs it with rustbpe, fastapi and uvicorn made unimportable.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python3 benchmarks/gpu_check.py` from a plain checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import picochat.model as M  # noqa: E402
from picochat.common import shutdown_distributed  # noqa: E402
from picochat.data.shards import shard_name, write_shard  # noqa: E402
from picochat.engine import Engine  # noqa: E402
from picochat.model import GPT, KVCache, config_from_depth  # noqa: E402
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

DATASET = "gpucheck"
CHECK_NAMES = ("fused_ops", "head_loss", "kv_cache", "sharded_optim", "eval_memory", "train",
               "compile_vs_eager", "resume")

# Everything that differs between a real GPU run and --cpu-dry-run; flags left unset take these.
# The dry run compiles nothing: torch.compile on a CPU takes ~30 s even for a d1 model, so there
# compile_vs_eager compares two eager runs (its code path runs, its ratio means nothing).
GPU_PLAN = dict(device="cuda", backend="nccl", vocab_size=65536, seq_len=2048, op_depth=20, op_rows=4,
                depths=[20, 12], steps=10, head_chunks=[256, 512, 1024, 2048, 4096, 8192],
                eval_batch=32, optim_depth=12, kv_prompt=128, kv_new=64, compile="yes", compare_compile="yes",
                resume=dict(depth=4, seq_len=512, rows=8), resume_tol=1e-3, timeout=480)
DRY_PLAN = dict(device="cpu", backend="gloo", vocab_size=512, seq_len=64, op_depth=2, op_rows=2,
                depths=[2], steps=4, head_chunks=[16, 32, 64, 128],
                eval_batch=32, optim_depth=2, kv_prompt=16, kv_new=12, compile="no", compare_compile="no",
                resume=dict(depth=1, seq_len=64, rows=4), resume_tol=0.0, timeout=300)
RESUME_STEPS, RESUME_SAVE_EVERY = 12, 4  # killed right after the step-4 checkpoint, 8 steps early


def log(message: str = "") -> None:
    print(message, flush=True)


def default_device_batch(depth: int, dry_run: bool) -> int:
    """Rows of 2048 per micro-batch: 16 at d20 (32 would need ~90 GiB of activations), 32 below."""
    if dry_run:
        return 4
    return 16 if depth >= 16 else 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, reps: int = 5) -> float:
    """Median wall time of fn() in milliseconds, after one untimed warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item()


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the largest |want|: one number for a whole tensor."""
    return max_abs(got.double() - want.double()) / max(max_abs(want.double()), 1e-30)


# -----------------------------------------------------------------------------
# The synthetic tokenizer and dataset

def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """256 single bytes, then two-byte tokens as merges (printable ASCII pairs first), then the
    nine specials: a valid tiktoken vocabulary of exactly vocab_size without training one."""
    n_merges = vocab_size - len(SPECIAL_TOKENS) - 256
    if not 0 < n_merges <= 256 * 256:
        raise ValueError(f"vocab size {vocab_size} does not fit 256 bytes + two-byte merges + specials")
    printable = list(range(32, 127))
    byte_order = printable + [b for b in range(256) if b not in printable]
    pairs = itertools.islice(itertools.product(byte_order, repeat=2), n_merges)
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update((bytes(pair), 256 + i) for i, pair in enumerate(pairs))
    return Tokenizer(ranks)


def synthetic_docs(n_docs: int, chars_per_doc: int, seed: int) -> list[str]:
    """Sentences of random words from a fixed 400-word lexicon: easy enough that the loss falls
    within ten steps, varied enough that it does not collapse to zero."""
    rng = random.Random(0)  # the lexicon is the same for every split
    letters = "etaoinshrdlcumwfgypbvk"
    lexicon = ["".join(rng.choices(letters, k=rng.randint(2, 8))) for _ in range(400)]
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words, size = [], 0
        while size < chars_per_doc:
            word = rng.choice(lexicon)
            words.append(word)
            size += len(word) + 1
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def write_synthetic_home(home: Path, vocab_size: int, dry_run: bool) -> None:
    """tokenizer/ and data/gpucheck/ (2 train shards and 1 val shard) under home."""
    synthetic_tokenizer(vocab_size).save(home / "tokenizer")
    n_docs, chars = (200, 400) if dry_run else (1500, 1500)  # ~4.5 MB of text on the GPU box
    root = home / "data" / DATASET
    for i in range(2):
        write_shard(root / shard_name(i, "train"), synthetic_docs(n_docs, chars, seed=1 + i), row_group_size=100)
    write_shard(root / shard_name(0, "val"), synthetic_docs(n_docs // 4, chars, seed=100), row_group_size=100)


# -----------------------------------------------------------------------------
# Models with random weights for the in-process checks

def random_model(depth: int, vocab_size: int, seq_len: int, device, dtype, seed: int = 0) -> GPT:
    """A GPT with the usual init, except that the zero-initialized matrices (head, output
    projections) get the same random init as the others: at zero every block would be the
    identity and every logit equal, and the checks would compare nothing."""
    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs: a d20 model is 2 GiB of fp32 weights
        model = GPT(config_from_depth(depth, vocab_size, seq_len), compute_dtype=dtype)
    model.init_weights(seed=seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, M.Linear) and not module.weight.any():
                module.weight.normal_(0.0, module.weight.size(1) ** -0.5)
    return model


# -----------------------------------------------------------------------------
# Check 1: the fused elementwise ops

def run_fwd_bwd(fn, x, grad, extra):
    x = x.detach().clone().requires_grad_()
    y = fn(x, *extra)
    (gx,) = torch.autograd.grad(y, x, grad)
    return y, gx


def check_fused_ops(ctx) -> tuple[bool, str, str, dict]:
    p, device, dtype = ctx.plan, ctx.device, ctx.dtype
    cfg = config_from_depth(p["op_depth"], p["vocab_size"], p["seq_len"])
    B, T, H, D = p["op_rows"], cfg.sequence_len, cfg.n_head, cfg.head_dim
    inv_freq = M.ROPE_BASE ** -(torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64, device=device), inv_freq)
    rotary = (angles.cos()[None, :, None, :], angles.sin()[None, :, None, :])
    cases = {  # name: (fast, reference, input shape, extra args in float64)
        "norm": (M.norm, M.reference_norm, (B, T, cfg.n_embd), ()),
        "rotary_norm": (M.rotary_norm, M.reference_rotary_norm, (B, T, H, D), rotary),
        "relu_squared": (M.relu_squared, M.reference_relu_squared, (B, T, 4 * cfg.n_embd), ()),
    }
    eps = torch.finfo(dtype).eps
    numbers, failed, worst = {}, [], 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (fast, ref, shape, extra64) in cases.items():
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
        grad = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
        truth = run_fwd_bwd(ref, x, grad, extra64)  # the same math in fp64
        extra = tuple(e.to(dtype) for e in extra64)
        xd, gd = x.to(dtype), grad.to(dtype)
        got, want = run_fwd_bwd(fast, xd, gd, extra), run_fwd_bwd(ref, xd, gd, extra)
        for what, g, w, t in zip(("forward", "backward"), got, want, truth):
            err_fast, err_ref = max_abs(g.double() - t), max_abs(w.double() - t)
            tol = 2 * err_ref + eps * max_abs(t)
            key = f"{name}_{what}"
            numbers[key] = dict(max_abs_vs_ref=max_abs(g.double() - w.double()), max_rel_vs_ref=rel_diff(g, w),
                                err_fast_vs_fp64=err_fast, err_ref_vs_fp64=err_ref, tolerance=tol)
            worst = max(worst, rel_diff(g, w))
            log(f"  {key:<22} fast vs ref: max abs {numbers[key]['max_abs_vs_ref']:.3g}, rel "
                f"{numbers[key]['max_rel_vs_ref']:.3g} | vs fp64: fast {err_fast:.3g}, ref {err_ref:.3g}, "
                f"tolerance {tol:.3g}")
            if err_fast > tol:
                failed.append(key)
        fast_ms = median_ms(lambda: run_fwd_bwd(fast, xd, gd, extra), device)
        ref_ms = median_ms(lambda: run_fwd_bwd(ref, xd, gd, extra), device)
        numbers[f"{name}_ms"] = dict(fast=fast_ms, reference=ref_ms)
        log(f"  {name:<22} fwd+bwd {fast_ms:.2f} ms fast, {ref_ms:.2f} ms reference ({ref_ms / fast_ms:.2f}x)")
    result = "all within bf16 tolerance" if not failed else "out of tolerance: " + ", ".join(failed)
    return not failed, result, f"max rel vs ref {worst:.2g}", numbers


# -----------------------------------------------------------------------------
# Check 1b: the fused head loss at several chunk sizes

def check_head_loss(ctx) -> tuple[bool, str, str, dict]:
    p, device, dtype = ctx.plan, ctx.device, ctx.dtype
    cfg = config_from_depth(p["op_depth"], p["vocab_size"], p["seq_len"])
    N, d, V = p["op_rows"] * cfg.sequence_len, cfg.n_embd, cfg.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, d, generator=gen, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, d, generator=gen, device=device) * d ** -0.5).requires_grad_()  # fp32 master weight
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    targets[: N // 16] = -1  # some ignored rows, as in SFT masks

    def loss_and_grads(fn):
        x.grad, w.grad = None, None
        loss = fn()
        loss.backward()
        return loss.detach(), x.grad.clone(), w.grad.clone()

    reference = lambda: M.reference_head_loss(x, w, targets)  # noqa: E731
    want = loss_and_grads(reference)
    eps = torch.finfo(dtype).eps
    numbers = {"rows": N, "width": d, "vocab": V, "reference_ms": median_ms(lambda: loss_and_grads(reference), device)}
    log(f"  {N} rows x width {d} x vocab {V:,}; reference (full fp32 logits): {numbers['reference_ms']:.2f} ms fwd+bwd")
    variants = {"eager": {}}
    if ctx.args.head_compiled:  # what base_train runs on CUDA with --compile: each chunk compiled
        variants["compiled"] = dict(compiled=True)
    failed, timings = [], {}
    for variant, kwargs in variants.items():
        for chunk in p["head_chunks"]:
            if chunk > N:
                continue
            fused = lambda: M.head_loss(x, w, targets, chunk_rows=chunk, **kwargs)  # noqa: E731
            got = loss_and_grads(fused)
            errs = [rel_diff(g, t) for g, t in zip(got, want)]
            # the loss is a mean in fp32: only the chunked summation order differs; gradients pass
            # through bf16 matmuls chunk by chunk: a few bf16 epsilons of the largest value
            ok = errs[0] <= eps and errs[1] <= 4 * eps and errs[2] <= 4 * eps
            ms = median_ms(lambda: loss_and_grads(fused), device)
            timings[variant, chunk] = ms
            numbers[f"{variant}_chunk_{chunk}"] = dict(ms=ms, loss_rel=errs[0], grad_x_rel=errs[1], grad_w_rel=errs[2])
            log(f"  {variant:>8} chunk {chunk:>5}: {ms:8.2f} ms fwd+bwd | rel diff vs reference: loss {errs[0]:.2g}, "
                f"grad x {errs[1]:.2g}, grad w {errs[2]:.2g}{'' if ok else '  <-- out of tolerance'}")
            if not ok:
                failed.append(f"{variant} {chunk}")
    best_variant, best = min(timings, key=timings.get)
    numbers["best_variant"] = best_variant
    numbers["best_chunk_rows"] = best
    default = M.head_chunk_rows(device) if hasattr(M, "head_chunk_rows") else None
    numbers["default_chunk_rows"] = default
    ms = timings[best_variant, best]
    log(f"  fastest chunk size on this device: {best} rows, {best_variant} ({ms:.2f} ms); "
        f"picochat's default here: {default}")
    result = "all chunk sizes match the reference" if not failed else f"out of tolerance: {', '.join(failed)}"
    return not failed, result, f"best chunk {best} {best_variant} ({ms:.1f} ms), default {default}", numbers


# -----------------------------------------------------------------------------
# Check 2: KV-cache decoding against full forwards

class NoSpecialTokens:
    """What Engine needs of a tokenizer, with every special token outside the model's vocabulary.
    The model is random, so it could emit <|python_start|> or <|bos|> at any step; this check is
    about the cache, not the tool-use state machine, so no token may stop a row or call a tool."""

    def __init__(self, vocab_size: int):
        self.bos_id = vocab_size

    def encode_special(self, name: str) -> int:
        return self.bos_id + 1 + SPECIAL_TOKENS.index(name)


@torch.no_grad()
def check_kv_cache(ctx) -> tuple[bool, str, str, dict]:
    p, device, dtype = ctx.plan, ctx.device, ctx.dtype
    model = random_model(p["op_depth"], p["vocab_size"], p["seq_len"], device, dtype).eval()
    P, K = p["kv_prompt"], p["kv_new"]
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, p["vocab_size"], (P,), generator=gen).tolist()
    engine = Engine(model, NoSpecialTokens(p["vocab_size"]))
    rows, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=K, temperature=0.0)
    tokens = rows[0]
    K = len(tokens) - P  # (no token can end a row early here, but count what came back)
    # The reference: one full forward over prompt + generated tokens, no cache.
    full = model(torch.tensor([tokens], device=device))[0, P - 1:-1]  # the logits that chose each new token
    # The same tokens fed through a KV cache one at a time (teacher forcing), as Engine decodes.
    cache = KVCache(model.config, 1, len(tokens), device, dtype)
    cached = [model(torch.tensor([prompt], device=device), kv_cache=cache)[0, -1]]
    for t in tokens[P:-1]:
        cached.append(model(torch.tensor([[t]], device=device), kv_cache=cache)[0, -1])
    cached = torch.stack(cached)
    logit_diff = max_abs(cached - full)
    # Greedy tokens: Engine's token must be the full forward's argmax, unless the two are within
    # rounding of a tie (bf16 logits of a cached and an uncached pass differ in the last bits).
    new = torch.tensor(tokens[P:], device=device)
    margin = full.max(dim=-1).values - full.gather(1, new.unsqueeze(1)).squeeze(1)
    agree = int((full.argmax(dim=-1) == new).sum())
    logit_tol = 16 * torch.finfo(dtype).eps * max(max_abs(full), 1.0)
    # Engine decodes on the fast path (fused q/k/v, RoPE and QK-norm in fp32), which rounds unlike
    # this plain forward: a margin within the logit tolerance is a tie too, not a mismatch.
    tie_tol = max(4 * logit_diff, logit_tol, 1e-6)
    clear_mismatches = int((margin > tie_tol).sum())
    numbers = dict(prompt=P, new_tokens=K, rows_identical=rows[0] == rows[1], max_logit_diff=logit_diff,
                   logit_tolerance=logit_tol, greedy_agree=agree, clear_mismatches=clear_mismatches,
                   max_abs_logit=max_abs(full))
    log(f"  prompt {P} + {K} greedy tokens, 2 rows; cached vs full logits: max diff {logit_diff:.3g} "
        f"(tolerance {logit_tol:.3g}, largest logit {max_abs(full):.3g}); greedy tokens equal the full "
        f"forward's argmax at {agree}/{K} steps, {clear_mismatches} clear mismatches")
    decode = decode_speed(ctx, model, prompt, K)
    numbers["decode"] = decode
    ok = (rows[0] == rows[1] and logit_diff <= logit_tol and clear_mismatches == 0
          and decode["compiled_ran"] and decode["prefill_compiled_ran"])
    return ok, f"greedy {agree}/{K} equal, {clear_mismatches} clear mismatches", \
        f"max logit diff {logit_diff:.2g} (tol {logit_tol:.2g}); {decode['summary']}", numbers


# Peak HBM bandwidth in GB/s by device name (vendor datasheets), most specific name first: the bound
# a batch-1 decode step meets when it reads every weight once per token.
# Longer names first: "L40S" before "L40" before "L4"; "H100 NVL" and "H100 PCIe" before "H100".
HBM_GBPS = (("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("A100 80GB PCIe", 1935),
            ("A100-SXM4-80GB", 2039), ("A100", 1555), ("L40S", 864), ("L40", 864), ("A10", 600), ("L4", 300))


def hbm_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in HBM_GBPS if key in name), None)


def decode_speed(ctx, model: GPT, prompt: list[int], tokens: int) -> dict:
    """Batch-1 greedy decoding on the fast path (GPT.decode_step over prepared weights), eager and
    compiled (CompiledDecode: static shapes and CUDA graphs on CUDA; the aot_eager backend in the
    dry run), timed after a warm-up that compiles every bucket it needs. Bandwidth: the bytes a
    step must read (every matmul weight in the compute dtype, one embedding row, the KV cache)
    per ms/step, against the device's HBM peak (issue: at least 50% at d20 batch 1). Reported,
    not judged; the check fails only when the compiled path fell back to eager."""
    device = ctx.device
    tok = NoSpecialTokens(ctx.plan["vocab_size"])
    # One model copy per path: decode_weights keeps one layout at a time (packed for eager CPU
    # matmuls, plain for the compiler), so a shared model would rebuild its weights inside the timing.
    eager = Engine(copy.deepcopy(model).prepare_for_inference(), tok, compile=False)
    compiled = Engine(copy.deepcopy(model).prepare_for_inference(), tok, compile=False)
    compiled.compiled = M.CompiledDecode(mode="reduce-overhead") if device.type == "cuda" \
        else M.CompiledDecode(backend="aot_eager")
    compiled.compiled_prefill = M.CompiledPrefill() if device.type == "cuda" else M.CompiledPrefill(backend="aot_eager")
    fast = eager.model

    def greedy(engine) -> list[int]:
        return [column[0] for column, _ in engine.generate(prompt, 1, max_tokens=tokens, temperature=0.0)]

    def steps_ms(engine) -> float:
        """ms per decode step on one cache kept across rounds, as the server keeps its own: a CUDA
        graph captured in the warm-up round replays on the same cache, never re-recorded."""
        m = engine.model
        cache = M.RowKVCache(m.config, 1, len(prompt) + tokens + 1, device, M.kv_cache_dtype(m.compute_dtype, device))
        logits, prefill = engine.prefill(prompt)
        cache.load_row(0, prefill)
        cache.rows = 1
        out = []
        for _ in range(2):  # a warm-up round (compiles and captures the buckets it needs), then the timed one
            cache.lengths[0] = len(prompt)
            ids = logits.argmax(dim=-1)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(tokens):
                ids = m.decode_step(ids, cache, masked=True, compiled=engine.compiled).argmax(dim=-1)
            sync(device)
            out.append(1000 * (time.perf_counter() - t0) / tokens)
        return out

    t_compile = time.perf_counter()
    compiled_tokens = greedy(compiled)  # also compiles the prefill and the decode buckets
    t_compile = time.perf_counter() - t_compile
    eager_tokens = greedy(eager)
    eager_ms, compiled_ms = steps_ms(eager)[1], steps_ms(compiled)[1]

    def prefill_ms(engine) -> float:
        engine.prefill(prompt)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        engine.prefill(prompt)
        sync(device)
        return 1000 * (time.perf_counter() - t0)
    eager_prefill, compiled_prefill = prefill_ms(eager), prefill_ms(compiled)
    c, item = fast.config, fast.compute_dtype.itemsize
    weights = sum(p.numel() for p in fast.parameters()) - fast.transformer.wte.weight.numel() + c.n_embd
    cache = 2 * c.n_layer * c.n_kv_head * c.head_dim * (len(prompt) + tokens // 2)  # keys + values, mean length
    step_bytes = (weights + cache) * item
    peak = hbm_gbps(device)
    numbers = dict(eager_ms_per_step=eager_ms, compiled_ms_per_step=compiled_ms, warmup_s=t_compile,
                   compiled_ran=compiled.compiled.failed is None, step_bytes=step_bytes,
                   eager_prefill_ms=eager_prefill, compiled_prefill_ms=compiled_prefill,
                   prefill_compiled_ran=compiled.compiled_prefill.failed is None,
                   same_tokens=sum(a == b for a, b in zip(eager_tokens, compiled_tokens)), tokens=len(eager_tokens),
                   hbm_gbps=peak)
    best = min(eager_ms, compiled_ms)
    numbers["achieved_gbps"] = step_bytes / best / 1e6
    numbers["bandwidth_fraction"] = numbers["achieved_gbps"] / peak if peak else None
    bound = f", {100 * numbers['bandwidth_fraction']:.0f}% of the {peak:,} GB/s HBM peak" if peak else ""
    log(f"  decode, batch 1: eager {eager_ms:.2f} ms/step, compiled {compiled_ms:.2f} ms/step "
        f"(warm-up with compilation {t_compile:.1f} s{'' if numbers['compiled_ran'] else '; FELL BACK TO EAGER: ' + repr(compiled.compiled.failed)}); "
        f"{step_bytes / 1e6:.0f} MB read per step -> {numbers['achieved_gbps']:.0f} GB/s{bound}; "
        f"compiled tokens equal eager's at {numbers['same_tokens']}/{numbers['tokens']} steps; "
        f"prefill of {len(prompt)} tokens: eager {eager_prefill:.1f} ms, compiled {compiled_prefill:.1f} ms"
        f"{'' if numbers['prefill_compiled_ran'] else ' (FELL BACK TO EAGER: ' + repr(compiled.compiled_prefill.failed) + ')'}")
    numbers["summary"] = f"decode {best:.2f} ms/step" + (f" ({100 * numbers['bandwidth_fraction']:.0f}% of HBM)" if peak else "")
    return numbers


# -----------------------------------------------------------------------------
# Check 3: the optimizer under a 1-rank process group

def check_sharded_optim(ctx) -> tuple[bool, str, str, dict]:
    p, device = ctx.plan, ctx.device
    plain = random_model(p["optim_depth"], p["vocab_size"], p["seq_len"], device, ctx.dtype)
    grouped = copy.deepcopy(plain)
    # The same gradients for both, drawn up front: a backward pass on the GPU is not bitwise
    # repeatable (the embedding's atomic adds), and this compares the optimizer alone.
    gen = torch.Generator(device=device).manual_seed(2)
    steps = 3
    grads = [[torch.randn(q.shape, generator=gen, device=device) for q in plain.parameters()] for _ in range(steps)]
    initial = [q.detach().clone() for q in plain.parameters()]

    def train(model, optimizer):
        for step_grads in grads:
            for q, g in zip(model.parameters(), step_grads):
                q.grad = g.clone()
            optimizer.step()
            model.zero_grad(set_to_none=True)

    train(plain, plain.setup_optimizer())
    backend = p["backend"]
    store = Path(ctx.home) / "pg_store"
    kwargs = dict(device_id=device) if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, **kwargs)
    try:
        optimizer = grouped.setup_optimizer()  # built under the group, as base_train does
        train(grouped, optimizer)
        # MuonAdamW sends nothing with one rank (reduce and broadcast are skipped at W = 1): check
        # the collectives it uses on their own, so a broken NCCL install shows up here too.
        t = torch.arange(8, dtype=torch.float32, device=device)
        expected = t.clone()
        dist.all_reduce(t)
        dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
        dist.broadcast(t, src=0)
        collectives_ok = torch.equal(t, expected)
        world = optimizer.world_size
    finally:
        shutdown_distributed()
    diff = max(max_abs(a - b) for a, b in zip(plain.parameters(), grouped.parameters()))
    moved = max(max_abs(a - b) for a, b in zip(plain.parameters(), initial))
    numbers = dict(backend=backend, steps=steps, max_param_diff=diff, max_update=moved,
                   optimizer_world_size=world, collectives_ok=collectives_ok)
    log(f"  {backend} group of 1: max |param difference| after {steps} steps {diff:.3g} "
        f"(largest update {moved:.3g}); reduce/broadcast/all_reduce {'ok' if collectives_ok else 'WRONG'}")
    # Bitwise: the same code runs, on the same inputs, with the same (deterministic) kernels.
    ok = diff == 0.0 and collectives_ok and moved > 0
    result = f"{backend} 1-rank update == no-group update" if ok else "updates or collectives differ"
    return ok, result, f"max diff {diff:.2g}, collectives {'ok' if collectives_ok else 'wrong'}", numbers


# -----------------------------------------------------------------------------
# Check 6: evaluation's peak memory

@torch.no_grad()
def check_eval_memory(ctx) -> tuple[bool, str, str, dict]:
    p, device, dtype = ctx.plan, ctx.device, ctx.dtype
    B, T, V = p["eval_batch"], p["seq_len"], p["vocab_size"]
    model = random_model(p["op_depth"], V, T, device, dtype).eval()
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randint(0, V, (B, T), generator=gen, device=device)
    y = torch.randint(0, V, (B, T), generator=gen, device=device)
    full_logits_gib = B * T * V * 4 / 2**30
    if device.type != "cuda":  # no allocator statistics on the CPU: run the same pass, check its output
        losses = model(x, y, loss_reduction="none")
        ok = losses.numel() == B * T and bool(torch.isfinite(losses).all())
        return ok, "ran (no memory statistics on CPU)", f"full logits would be {full_logits_gib:.3f} GiB", \
            dict(batch=B, full_logits_gib=full_logits_gib)
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    losses = model(x, y, loss_reduction="none")
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    extra_gib, peak_gib = (peak - before) / 2**30, peak / 2**30
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    numbers = dict(batch=B, seq_len=T, vocab=V, depth=p["op_depth"], weights_and_inputs_gib=before / 2**30,
                   peak_gib=peak_gib, eval_extra_gib=extra_gib, full_logits_gib=full_logits_gib,
                   device_total_gib=total_gib)
    log(f"  d{p['op_depth']} batch {B} x {T}: peak {peak_gib:.2f} GiB ({extra_gib:.2f} GiB above the weights "
        f"and inputs); the full fp32 logits alone would be {full_logits_gib:.2f} GiB; device {total_gib:.0f} GiB")
    ok = losses.numel() == B * T and bool(torch.isfinite(losses).all()) and extra_gib < full_logits_gib
    del losses, model
    torch.cuda.empty_cache()
    return ok, f"peak {peak_gib:.1f} GiB of {total_gib:.0f}", \
        f"+{extra_gib:.2f} GiB for eval (full logits: {full_logits_gib:.1f})", numbers


# -----------------------------------------------------------------------------
# Checks 4, 5, 7: real base_train processes

def child_env(home: Path) -> dict:
    env = dict(os.environ, PICOCHAT_HOME=str(home))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one plain process, not a torchrun rank
        env.pop(key, None)
    return env


def run_picochat(ctx, args: list[str], label: str, kill_marker: str | None = None) -> tuple[int, list[str]]:
    """Run `python3 -m picochat *args`, echoing its output as it comes. With kill_marker, SIGKILL
    it as soon as it prints that. Returns (exit code, output lines)."""
    cmd = [sys.executable, "-m", "picochat", *args]
    log(f"  $ {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(ctx.home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    timed_out = threading.Event()

    def on_timeout():  # a hung run must not hang the whole check
        timed_out.set()
        proc.kill()

    timer = threading.Timer(ctx.plan["timeout"], on_timeout)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            log(f"    {label} | {line}")
            if kill_marker and kill_marker in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.stdout.close()
        code = proc.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise RuntimeError(f"{label}: no result after {ctx.plan['timeout']} s (--timeout); killed")
    return code, lines


def parse_train_output(lines: list[str]) -> dict:
    """What base_train prints: the memory estimate, one line per step with loss, ms, tok/s and MFU,
    and (on CUDA) the peak memory. Matched by those phrases, whatever else the lines say."""
    out = {"steps": []}
    number = r"([-+\d.,]+|nan|inf)"
    for line in lines:
        if m := re.search(r"memory estimate\D*?([\d.]+)\s*GiB", line):
            out["memory_estimate_gib"] = float(m.group(1))  # the first number: training
            if m := re.search(r"([\d.]+)\s*GiB for evaluation", line):  # newer base_train adds this
                out["eval_memory_estimate_gib"] = float(m.group(1))
        elif m := re.search(r"peak memory\D*?([\d.]+)\s*GiB", line):
            out["peak_memory_gib"] = float(m.group(1))
        elif "tok/s" in line and "MFU" in line:
            step = re.search(r"step\s+(\d+)", line)
            loss = re.search(r"\bloss\s+" + number, line)
            ms = re.search(r"([\d,.]+)\s*ms\b", line)
            tps = re.search(r"([\d,.]+)\s*tok/s", line)
            mfu = re.search(r"MFU\s+([\d.]+)\s*%", line)
            if step and loss and ms and tps and mfu:
                out["steps"].append(dict(step=int(step.group(1)), loss=float(loss.group(1).replace(",", "")),
                                         ms=float(ms.group(1).replace(",", "")),
                                         tok_per_sec=float(tps.group(1).replace(",", "")),
                                         mfu=float(mfu.group(1)) / 100))
    return out


def train_args(ctx, depth: int, tag: str, compile_mode: str, steps: int, seq_len: int | None = None,
               rows: int | None = None) -> list[str]:
    """base_train's flags for a short run: one micro-batch per step, no periodic eval or samples
    (base_train still evaluates val bpb once and samples once at the last step)."""
    p = ctx.plan
    T = seq_len or p["seq_len"]
    B = rows or ctx.device_batch(depth)
    return ["base_train", "--dataset", DATASET, "--depth", str(depth), "--max-seq-len", str(T),
            "--device-batch-size", str(B), "--total-batch-size", str(B * T),  # one micro-batch per step
            "--num-iterations", str(steps), "--eval-every", "-1", "--eval-tokens", str(B * T),
            "--sample-every", "-1", "--device", p["device"], "--dtype", ctx.dtype_name,
            "--compile", compile_mode, "--model-tag", tag]


def train_run(ctx, depth: int, compile_mode: str, label: str) -> dict:
    """One short base_train run; returns the parsed numbers (and drops its multi-GiB checkpoint)."""
    steps = ctx.plan["steps"]
    tag = f"{label}_d{depth}"
    t0 = time.time()
    code, lines = run_picochat(ctx, train_args(ctx, depth, tag, compile_mode, steps), label=tag)
    wall = time.time() - t0
    shutil.rmtree(Path(ctx.home) / "checkpoints" / "base" / tag, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"base_train d{depth} exited with code {code}: {lines[-1] if lines else ''}")
    parsed = parse_train_output(lines)
    done = [s["step"] for s in parsed["steps"]]
    if done != list(range(1, steps + 1)):
        raise RuntimeError(f"expected step lines 1..{steps}, parsed {done}")
    s = parsed["steps"]
    steady = s[2:] if len(s) > 2 else s[1:] or s  # the first steps include compilation and warm-up
    parsed.update(depth=depth, compile=compile_mode, wall_s=wall, compile_s=s[0]["ms"] / 1000,
                  tok_per_sec=statistics.median(x["tok_per_sec"] for x in steady),
                  mfu=statistics.median(x["mfu"] for x in steady),
                  first_loss=s[0]["loss"], last_loss=s[-1]["loss"])
    return parsed


def check_train(ctx, depth: int) -> tuple[bool, str, str, dict]:
    r = train_run(ctx, depth, ctx.plan["compile"], "train")
    ctx.train_results[depth] = r
    est, peak = r.get("memory_estimate_gib"), r.get("peak_memory_gib")
    if est is None:
        mem = "no memory estimate printed"
    elif peak is None:
        mem = f"estimate {est:.2f} GiB (no peak on {ctx.device.type})"
    else:
        mem = f"peak {peak:.1f} GiB vs estimate {est:.1f}"
    first = "compile (first step)" if r["compile"] == "yes" else "first step"
    log(f"  d{depth}: {r['tok_per_sec']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, {first} {r['compile_s']:.1f} s, "
        f"{mem}, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, wall {r['wall_s']:.0f} s")
    if peak is not None and est:
        eval_est = r.get("eval_memory_estimate_gib")
        log(f"  peak / training estimate = {peak / est:.2f}" + (f", evaluation estimate {eval_est:.2f} GiB" if
            eval_est is not None else "") + " (the peak covers training, the final val eval and sampling)")
    falls = r["last_loss"] < r["first_loss"] and all(math.isfinite(x["loss"]) for x in r["steps"])
    needs_peak = ctx.device.type == "cuda"
    ok = falls and est is not None and (peak is not None or not needs_peak)
    result = "ran, loss falls" if falls else "loss did not fall"
    if est is None or (needs_peak and peak is None):
        result += "; memory lines missing"
    return ok, result, f"{r['tok_per_sec']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, {first} " \
                       f"{r['compile_s']:.1f} s, {mem}", r


def check_compile_vs_eager(ctx) -> tuple[bool, str, str, dict]:
    depth, mode = ctx.depths[-1], ctx.plan["compare_compile"]
    compiled = ctx.train_results.get(depth)  # the train check's run, when it was compiled
    if compiled is None or compiled["compile"] != mode:
        compiled = train_run(ctx, depth, mode, "compiled")
    eager = train_run(ctx, depth, "no", "eager")
    ratio = compiled["tok_per_sec"] / eager["tok_per_sec"]
    numbers = dict(depth=depth, compiled=compiled, eager=eager, speedup=ratio)
    note = "" if mode == "yes" else " (dry run: both eager)"
    log(f"  d{depth}: compiled {compiled['tok_per_sec']:,.0f} tok/s, eager {eager['tok_per_sec']:,.0f} tok/s: "
        f"{ratio:.2f}x{note}")
    ok = eager["last_loss"] < eager["first_loss"]
    return ok, f"compiled/eager {ratio:.2f}x{note}", \
        f"{compiled['tok_per_sec']:,.0f} vs {eager['tok_per_sec']:,.0f} tok/s at d{depth}", numbers


def metrics_losses(home: Path, tag: str) -> dict[int, float]:
    path = Path(home) / "checkpoints" / "base" / tag / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def check_resume(ctx) -> tuple[bool, str, str, dict]:
    r = ctx.plan["resume"]

    def args(tag: str) -> list[str]:  # compile "auto": what a real run does on this device
        return [*train_args(ctx, r["depth"], tag, "auto", RESUME_STEPS, seq_len=r["seq_len"], rows=r["rows"]),
                "--save-every", str(RESUME_SAVE_EVERY)]

    code, _ = run_picochat(ctx, args("straight"), label="straight")
    if code != 0:
        raise RuntimeError(f"the uninterrupted run exited with code {code}")
    expected = metrics_losses(ctx.home, "straight")

    marker = f"saved checkpoint step {RESUME_SAVE_EVERY}"
    code, _ = run_picochat(ctx, args("killed"), label="killed", kill_marker=marker)
    if code != -signal.SIGKILL:
        raise RuntimeError(f"the run to interrupt ended (code {code}) before printing {marker!r}")
    killed_at = max(metrics_losses(ctx.home, "killed"), default=0)
    code, lines = run_picochat(ctx, [*args("killed"), "--resume"], label="resumed")
    if code != 0 or not any("resumed from step" in line for line in lines):
        raise RuntimeError(f"the resumed run exited with code {code} or did not resume")
    resumed = metrics_losses(ctx.home, "killed")
    if sorted(resumed) != sorted(expected):
        raise RuntimeError(f"steps differ: uninterrupted {sorted(expected)}, resumed {sorted(resumed)}")
    diffs = {step: abs(resumed[step] - expected[step]) for step in expected}
    worst = max(diffs.values())
    tol = ctx.plan["resume_tol"]
    bitwise = worst == 0.0
    numbers = dict(steps=RESUME_STEPS, killed_after_step=killed_at, max_abs_loss_diff=worst, tolerance=tol,
                   bitwise_equal=bitwise, losses_uninterrupted=expected, losses_resumed=resumed)
    log(f"  killed after step {killed_at}, resumed to {RESUME_STEPS}: max |loss difference| {worst:.3g} over "
        f"{len(diffs)} steps ({'bit for bit' if bitwise else f'not bitwise; tolerance {tol:g}'})")
    ok = worst <= tol
    if not ok:
        result = f"resumed run differs by more than {tol:g}"
    else:
        result = "resumed run matches " + ("bit for bit" if bitwise else f"within {tol:g}")
    return ok, result, f"killed at step {killed_at}, max loss diff {worst:.2g}", numbers


# -----------------------------------------------------------------------------
# Running the checks and the table

class Context:
    """What every check reads: the plan, the device and dtype, the temporary PICOCHAT_HOME."""

    def __init__(self, args, plan: dict, home: Path):
        self.args, self.plan, self.home = args, plan, home
        self.dry_run = args.cpu_dry_run
        # NCCL wants a device with an index; base_train's children get plain --device cuda (cuda:0)
        self.device = torch.device("cuda", 0) if plan["device"] == "cuda" else torch.device("cpu")
        self.dtype, self.dtype_name = torch.bfloat16, "bfloat16"
        self.depths = plan["depths"]
        self.train_results: dict[int, dict] = {}

    def device_batch(self, depth: int) -> int:
        return self.args.device_batch_size or default_device_batch(depth, self.dry_run)


def planned_checks(ctx, selected: list[str]) -> list[tuple[str, callable]]:
    checks = []
    for name in selected:
        if name == "train":
            checks += [(f"train_d{d}", lambda c, d=d: check_train(c, d)) for d in ctx.depths]
        else:
            checks.append((name, globals()[f"check_{name}"]))
    return checks


def run_checks(ctx, checks, inject_failure: str | None) -> list[dict]:
    results = []
    for i, (name, fn) in enumerate(checks, 1):
        log(f"\n[{i}/{len(checks)}] {name}")
        t0 = time.time()
        try:
            if name == inject_failure:  # for tests: shows that a failing check fails the run
                raise RuntimeError("injected failure (--inject-failure)")
            ok, result, key, numbers = fn(ctx)
            error = None
        except Exception as e:  # noqa: BLE001 -- one check's failure must not stop the others
            traceback.print_exc(file=sys.stdout)
            ok, result, key, numbers = False, f"error: {type(e).__name__}: {e}".splitlines()[0][:120], "", {}
            error = traceback.format_exc()
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()  # give the memory back before a base_train process needs it
        seconds = time.time() - t0
        log(f"  -> {'PASS' if ok else 'FAIL'} in {seconds:.1f} s: {result}")
        results.append(dict(check=name, passed=ok, result=result, numbers_summary=key, seconds=seconds,
                            numbers=numbers, error=error))
    return results


def format_table(results: list[dict]) -> str:
    rows = [("check", "result", "numbers", "time", "pass/fail")]
    rows += [(r["check"], r["result"], r["numbers_summary"], f"{r['seconds']:.0f} s",
              "PASS" if r["passed"] else "FAIL") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Validate a GPU machine for picochat: fused ops, head loss chunk sizes, KV cache, "
                    "sharded optimizer on NCCL, eval memory, base_train speed and memory, compile vs "
                    "eager, resume. Meant to take under 8 minutes on one H100/H200; the module docstring "
                    "says what each check does and when it passes.")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every check's code path on this CPU with a tiny model (depth 2, vocab 512, "
                        "seq 64, 4 steps, gloo instead of NCCL, no compilation); default: off (CUDA)")
    p.add_argument("--out", metavar="FILE", help="also write the table and all raw numbers as JSON to FILE "
                                                 "(default: print only)")
    p.add_argument("--checks", default=",".join(CHECK_NAMES),
                   help=f"comma-separated checks to run, in this order (default: all: {','.join(CHECK_NAMES)}); "
                        "'train' is one run per --depths")
    p.add_argument("--depths", type=int_list, default=None,
                   help="base_train depths for the train checks; compile_vs_eager uses the last "
                        "(default: 20,12; --cpu-dry-run: 2). --depths 12 skips d20")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per base_train run (default: 10; --cpu-dry-run: 4)")
    p.add_argument("--device-batch-size", type=int, default=None,
                   help="rows per step in the base_train runs (default: 16 at depth >= 16, 32 below; "
                        "--cpu-dry-run: 4); each step is one micro-batch")
    p.add_argument("--op-depth", type=int, default=None,
                   help="model shapes for fused_ops, head_loss, kv_cache and eval_memory "
                        "(default: 20; --cpu-dry-run: 2)")
    p.add_argument("--head-chunks", type=int_list, default=None,
                   help="head_loss chunk sizes to compare and time (default: 256,512,1024,2048,4096,8192; "
                        "--cpu-dry-run: 16,32,64,128)")
    p.add_argument("--head-compiled", action="store_true",
                   help="also time head_loss(compiled=True), as base_train runs it on CUDA with --compile, "
                        "at each chunk size (one compilation per size: adds about a minute; default: off)")
    p.add_argument("--timeout", type=int, default=None,
                   help="seconds before a base_train process is killed (default: 480; --cpu-dry-run: 300)")
    p.add_argument("--keep-home", action="store_true",
                   help="keep the temporary PICOCHAT_HOME (synthetic data, logs) and print where it is "
                        "(default: deleted at the end)")
    p.add_argument("--inject-failure", metavar="CHECK", help=argparse.SUPPRESS)  # for tests
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = copy.deepcopy(DRY_PLAN if args.cpu_dry_run else GPU_PLAN)
    for flag, key in (("depths", "depths"), ("steps", "steps"), ("op_depth", "op_depth"),
                      ("head_chunks", "head_chunks"), ("timeout", "timeout")):
        if getattr(args, flag) is not None:
            plan[key] = getattr(args, flag)
    selected = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in selected if c not in CHECK_NAMES]
    if unknown:
        sys.stderr.write(f"gpu_check: unknown check(s) {unknown}; choose from {', '.join(CHECK_NAMES)}\n")
        return 2
    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: no CUDA GPU is visible; use --cpu-dry-run to try the checks on this CPU\n")
        return 2

    start = time.time()
    home = Path(tempfile.mkdtemp(prefix="picochat_gpu_check_"))
    ctx = Context(args, plan, home)
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu (dry run)"
    log(f"gpu_check on {name}: torch {torch.__version__}, {ctx.dtype_name}, depths {ctx.depths}, "
        f"{plan['steps']} steps per run; PICOCHAT_HOME={home}")
    try:
        t0 = time.time()
        write_synthetic_home(home, plan["vocab_size"], args.cpu_dry_run)
        log(f"synthetic tokenizer (vocab {plan['vocab_size']:,}) and dataset written in {time.time() - t0:.1f} s")
        results = run_checks(ctx, planned_checks(ctx, selected), args.inject_failure)
    finally:
        if args.keep_home:
            log(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    elapsed = time.time() - start

    table = format_table(results)
    passed = all(r["passed"] for r in results)
    log(f"\n{table}\n")
    log(f"{sum(r['passed'] for r in results)}/{len(results)} checks passed in {elapsed / 60:.1f} min")
    if args.out:
        report = dict(device=name, torch=torch.__version__, dry_run=args.cpu_dry_run, plan=plan,
                      elapsed_s=elapsed, passed=passed, table=table, checks=results)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
