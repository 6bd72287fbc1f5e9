"""
Validate a GPU machine for picochat in one command, within a time budget (default 8 minutes, so it
fits a rented 10-minute slot on one H100/H200):

    python3 benchmarks/gpu_check.py --out gpu_check.jsonl   # the checks below, in order, as time allows
    python3 benchmarks/gpu_check.py --quick                 # <= 4 min: correctness + the d20 training run
    python3 benchmarks/gpu_check.py --checks recipe_seed,recipe_2026,recipe_fp8 --budget 9
    python3 benchmarks/gpu_check.py --cpu-dry-run           # the same code paths, tiny, on this CPU

It needs only what a bare GPU box has: torch, tiktoken, pyarrow, numpy (no rustbpe, no fastapi, no
network). The tokenizer and the dataset are written into a temporary PICOCHAT_HOME (in /dev/shm
when it has room, else $TMPDIR; deleted at the end unless the run is killed): 256 single
bytes plus two-byte merges up to a 65,536-token vocabulary (picochat's own tokenizer format, built
without training), and shards of real text that every such machine has: the Python source of the
standard library and of torch itself, split by file into train and val.

The time budget: before each check, its estimated time (the GPU_PLAN guesses below, scaled by how
far off the finished base_train runs were) is compared with the time left; a check that does not
fit is skipped and the table says so. A base_train process is killed when the budget (plus 30 s)
runs out. Every finished check is appended to --out at once, as one JSON line, so a run killed
from outside still leaves what it finished; the run's first line records the device and the torch
and CUDA versions (with a warning when torch is not the pinned build of runs/torch_install.py),
its last the table. Every line carries the run's id: a rerun appends under a new one.

The checks, in order (each one's failure is caught, so the others still run):
  fused_ops         norm, rotary_norm, relu_squared (the fused autograd Functions in picochat/model.py)
                    against their references, forward and input gradient, in bf16 at d20 shapes.
                    Pass: the fast path's error against an fp64 ground truth is at most twice the
                    bf16 reference's error plus one bf16 epsilon of the largest value.
  head_loss         the fused chunked head loss against reference_head_loss (loss, grad of x, grad
                    of the head weight) at several chunk sizes, each timed (forward + backward,
                    median of a few reps): the fastest chunk size for this device is printed.
                    --head-compiled also times head_loss(compiled=True), as base_train runs it.
  fp8               picochat/fp8.py where fp8_support says yes (skipped, saying why, elsewhere): an
                    FP8 matmul's output and gradients against fp64 and bf16 at d20's MLP shape, the
                    MLP's forward + backward timed in FP8 and bf16, and a model under fp8_disabled
                    giving the bf16 result bit for bit. Pass: FP8 errors within FP8 rounding
                    (relative 0.06 forward, 0.09 gradients; a wrong scale errs by O(1)).
  sharded_optim     MuonAdamW under a 1-rank NCCL process group makes the same update as with no
                    process group, bit for bit, and NCCL's reduce, broadcast and all_reduce work.
  eval_memory       peak GPU memory of a val-bpb forward, model(x, y, loss_reduction="none") under
                    no_grad at batch 32 x 2048, d20, vocab 65,536. Pass: the extra memory is less
                    than the full fp32 logits would take (the head is evaluated in chunks).
  recipe_seed,      whether the CPU ablations of the 2026 recipe carry over to a GPU: `base_train
  recipe_2026,      --recipe seed` and `--recipe 2026` at d12 for the same tokens (120 steps of
  recipe_fp8        32 x 2048), compiled, each with its recipe's own values as at a short horizon
                    its rules give them (as benchmarks/recipe_ablation.py runs them on the CPU;
                    --recipe-extra adds flags to all three); then the 2026 run again with --fp8
                    where the GPU has FP8 and base_train has the flag. Reported: final val bpb and
                    tok/s side by side (2026 against seed, FP8 against bf16). Pass: each trains
                    (exit 0, loss falls, finite bpb), and FP8's val bpb is within 3% of bf16's
                    (nanochat: equal quality at d26).
  train_d20, ...    a real `python3 -m picochat base_train` per --depths at the preset's device
                    batch (32 rows of 2048; 2 micro-batches per step, where the d20 preset
                    accumulates 16): tok/s, MFU, compile time (the first step's time), peak memory
                    against base_train's printed estimate, with the estimate's error. Out of
                    memory at 32 rows, it retries at 16 (reported). Pass: exit 0, memory lines
                    printed, the loss falls.
  kv_cache          Engine's greedy decoding (2 rows, KV cache) against one full forward over the same
                    tokens, and the KV cache fed those tokens one at a time against the full forward's
                    logits. Pass: both rows agree, the logits agree within 16 bf16 epsilons of the
                    largest logit, and each greedy token is the full forward's argmax unless the two
                    are within rounding of a tie. Then batch-1 decode speed of the fast path, eager
                    and compiled (CUDA graphs), at d20: ms/step and the bandwidth it reaches against
                    the GPU's HBM peak (reported; fails only if the compiled step fell back to eager).
  compile_vs_eager  recipe_2026's run again with --compile no: compiled / eager tok/s (reported,
                    not judged; passes when the eager run trains).
  resume            a small run with checkpoints, the same run SIGKILLed after its first checkpoint
                    and resumed: per-step losses in metrics.jsonl must match the uninterrupted
                    run's (bit for bit on the CPU; within 1e-3 on CUDA, where the embedding
                    backward's atomic adds already make two identical runs differ slightly).

It prints progress as it goes, one table at the end (check | result | numbers | time | PASS, FAIL
or SKIP), and exits 1 if any check failed (a skipped check is not a failure). After a CUDA error
that leaves this process's CUDA context unusable, the in-process checks are skipped and the
base_train runs (separate processes) go on.

--cpu-dry-run runs every check's code path here, small: depth 2, vocab 512, 64-token rows,
4 steps, gloo instead of NCCL, nothing compiled, no GPU memory statistics, FP8 through the CPU's
reference _scaled_mm (recipe_fp8 is skipped: no FP8 GPU). tests/test_gpu_check.py runs it with
rustbpe, fastapi and uvicorn made unimportable, and kills one midway.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python3 benchmarks/gpu_check.py` from a plain checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import picochat.decode as D  # noqa: E402
import picochat.model as M  # noqa: E402
import picochat.ops as ops  # noqa: E402
from picochat.common import shutdown_distributed  # noqa: E402
from picochat.data.shards import shard_name, write_shard  # noqa: E402
from picochat.engine import Engine  # noqa: E402
from picochat.fp8 import Float8Linear, enable_fp8, fp8_disabled, fp8_support  # noqa: E402
from picochat.model import GPT, config_from_depth  # noqa: E402
from picochat.scheduler import generate, generate_batch  # noqa: E402
from picochat.stages.base_train import build_parser as base_train_parser  # noqa: E402
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

DATASET = "gpucheck"
CHECK_NAMES = ("fused_ops", "head_loss", "fp8", "sharded_optim", "eval_memory", "recipe_seed", "recipe_2026",
               "recipe_fp8", "train", "kv_cache", "compile_vs_eager", "resume")
QUICK_CHECKS = ("fused_ops", "head_loss", "fp8", "sharded_optim", "eval_memory", "train")
IN_PROCESS = {"fused_ops", "head_loss", "fp8", "sharded_optim", "eval_memory", "kv_cache"}  # use this process's CUDA
RECIPE_FLAGS = {"recipe_seed": ["--recipe", "seed"], "recipe_2026": ["--recipe", "2026"],
                "recipe_fp8": ["--recipe", "2026", "--fp8"]}
RECIPE_BASELINE = {"recipe_2026": "recipe_seed", "recipe_fp8": "recipe_2026"}  # what each is compared with
FP8_BPB_TOLERANCE = 0.03  # relative; nanochat HEAD measured FP8 tensorwise at equal quality (d26, its LOG)
BUDGET_MIN, QUICK_BUDGET_MIN = 8.0, 4.0  # minutes: a 10-minute GPU slot, with room to start and copy back
BUDGET_GRACE_S = 30  # a base_train run may overrun the budget by this much before it is killed

# Everything that differs between a real GPU run and --cpu-dry-run; flags left unset take these.
# The dry run compiles nothing: torch.compile on a CPU takes ~30 s even for a d1 model, so there
# compile_vs_eager compares two eager runs (its code path runs, its ratio means nothing).
# `estimates` are seconds per check. On a GPU they are guesses (no GPU has run this script yet:
# nanochat's compile times, picochat's FLOPs at ~40% MFU); every --out records the real ones.
GPU_PLAN = dict(device="cuda", backend="nccl", vocab_size=65536, seq_len=2048, op_depth=20, op_rows=4,
                depths=[20], rows=32, train_accum=2, steps=10, head_chunks=[256, 512, 1024, 2048, 4096, 8192],
                eval_batch=32, optim_depth=12, kv_prompt=128, kv_new=64, compile="yes", compare_compile="yes",
                recipe=dict(depth=12, steps=120, eval_rows=256, extra=[]),
                resume=dict(depth=4, seq_len=512, rows=8), resume_tol=1e-3, timeout=480,
                text=dict(max_chars=40_000_000, doc_chars=4000, file_chars=100_000),
                estimates=dict(fused_ops=15, head_loss=25, fp8=40, sharded_optim=10, eval_memory=15, recipe=95,
                               train=120, kv_cache=150, compile_vs_eager=60, resume=150))
DRY_PLAN = dict(device="cpu", backend="gloo", vocab_size=512, seq_len=64, op_depth=2, op_rows=2,
                depths=[2], rows=4, train_accum=2, steps=4, head_chunks=[16, 32, 64, 128],
                eval_batch=32, optim_depth=2, kv_prompt=16, kv_new=12, compile="no", compare_compile="no",
                recipe=dict(depth=2, steps=4, eval_rows=8, extra=[]),
                resume=dict(depth=1, seq_len=64, rows=4), resume_tol=0.0, timeout=300,
                text=dict(max_chars=80_000, doc_chars=400, file_chars=1200),
                estimates=dict(fused_ops=2, head_loss=2, fp8=2, sharded_optim=2, eval_memory=1, recipe=15,
                               train=15, kv_cache=10, compile_vs_eager=15, resume=40))
RESUME_STEPS, RESUME_SAVE_EVERY = 12, 4  # killed right after the step-4 checkpoint, 8 steps early


class Skip(Exception):
    """Raised by a check that cannot run here (no FP8 GPU, a flag base_train lacks): its reason."""


def log(message: str = "") -> None:
    print(message, flush=True)


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


def rel_norm(got: torch.Tensor, truth: torch.Tensor) -> float:
    """‖got − truth‖ / ‖truth‖: the average relative error of a whole tensor."""
    return ((got.double() - truth.double()).norm() / truth.double().norm().clamp(min=1e-30)).item()


# -----------------------------------------------------------------------------
# Versions

def pinned_torch() -> tuple[str, str]:
    """(CPU pin, GPU pin) of runs/torch_install.py, e.g. ("2.13.0", "2.9.1")."""
    spec = importlib.util.spec_from_file_location("torch_install", REPO / "runs" / "torch_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TORCH_CPU.split("==")[-1], module.TORCH_GPU


def versions(device: torch.device) -> dict:
    """What this run used, and a warning when torch is not the build `make venv` pins."""
    cpu_pin, gpu_pin = pinned_torch()
    pin = gpu_pin if device.type == "cuda" else cpu_pin
    v = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(), pinned_torch=pin,
             device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu")
    if device.type == "cuda":
        v.update(capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                 cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
    v["warning"] = None if torch.__version__.split("+")[0] == pin else (
        f"torch {torch.__version__} is not the pinned {pin} (runs/torch_install.py): kernels, compile times "
        f"and tok/s may differ from a machine set up by `make venv`")
    return v


# -----------------------------------------------------------------------------
# The synthetic tokenizer and the dataset

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


def python_source_documents(max_chars: int, doc_chars: int, file_chars: int) -> tuple[list[str], list[str]]:
    """(train, val) documents of at most doc_chars from the Python sources of the standard library,
    then of torch: real text with long-range structure (code, comments, docstrings) that every
    machine running this script has, so two recipes can differ in more than unigram statistics.
    At most file_chars from one file; every 20th file is val, so no val file is seen in training."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(torch.__file__).parent]
    train, val, total, n_files = [], [], 0, 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if {"site-packages", "dist-packages"} & set(path.parts[len(root.parts):]):
                continue  # installed packages, not the standard library
            try:
                text = path.read_text(encoding="utf-8")[:file_chars]
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip():
                continue
            split = val if n_files % 20 == 0 else train
            n_files += 1
            split.extend(text[i:i + doc_chars] for i in range(0, len(text), doc_chars))
            total += len(text)
            if total >= max_chars:
                return train, val
    return train, val


def write_synthetic_home(home: Path, plan: dict) -> dict:
    """tokenizer/ and data/gpucheck/ (2 train shards and 1 val shard) under home; returns sizes."""
    synthetic_tokenizer(plan["vocab_size"]).save(home / "tokenizer")
    train, val = python_source_documents(**plan["text"])
    random.Random(0).shuffle(train)  # files of one package are alike: mix them across the shards
    root = home / "data" / DATASET
    half = len(train) // 2
    shards = {shard_name(0, "train"): train[:half], shard_name(1, "train"): train[half:], shard_name(0, "val"): val}
    for name, docs in shards.items():  # 8+ row groups each: enough for 8 data streams (micro-batches)
        write_shard(root / name, docs, row_group_size=max(1, min(100, len(docs) // 8)))
    return dict(train_docs=len(train), val_docs=len(val), train_chars=sum(map(len, train)),
                val_chars=sum(map(len, val)))


def scratch_dir(dry_run: bool) -> str | None:
    """Where the temporary PICOCHAT_HOME goes: memory (/dev/shm) on a GPU box with room there for
    a d20 checkpoint and its optimizer state (~7 GB, written at the end of every base_train run),
    so no check waits on a slow disk; else $TMPDIR."""
    try:
        return "/dev/shm" if not dry_run and shutil.disk_usage("/dev/shm").free > 32 * 2**30 else None
    except OSError:
        return None


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
# The fused elementwise ops

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
        "norm": (ops.norm, ops.reference_norm, (B, T, cfg.n_embd), ()),
        "rotary_norm": (ops.rotary_norm, ops.reference_rotary_norm, (B, T, H, D), rotary),
        "relu_squared": (ops.relu_squared, ops.reference_relu_squared, (B, T, 4 * cfg.n_embd), ()),
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
# The fused head loss at several chunk sizes

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

    reference = lambda: ops.reference_head_loss(x, w, targets)  # noqa: E731
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
            fused = lambda: ops.head_loss(x, w, targets, chunk_rows=chunk, **kwargs)  # noqa: E731
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
    default = ops.head_chunk_rows(device)
    numbers["default_chunk_rows"] = default
    ms = timings[best_variant, best]
    log(f"  fastest chunk size on this device: {best} rows, {best_variant} ({ms:.2f} ms); "
        f"picochat's default here: {default}")
    result = "all chunk sizes match the reference" if not failed else f"out of tolerance: {', '.join(failed)}"
    return not failed, result, f"best chunk {best} {best_variant} ({ms:.1f} ms), default {default}", numbers


# -----------------------------------------------------------------------------
# KV-cache decoding against full forwards

class NoSpecialTokens:
    """What Engine needs of a tokenizer, with every special token outside the model's vocabulary.
    The model is random, so it could emit <|python_start|> or <|bos|> at any step; this check is
    about the cache, not the tool-use state machine, so no token may stop a row or call a tool."""

    def __init__(self, vocab_size: int):
        self.bos_id = vocab_size

    def encode_special(self, name: str) -> int:
        return self.bos_id + 1 + SPECIAL_TOKENS.index(name)

    @property
    def special_ids(self) -> dict[str, int]:
        return {name: self.encode_special(name) for name in SPECIAL_TOKENS}

    def id_to_bytes(self, token: int) -> bytes:  # the Scheduler streams text; nothing here reads it
        return b"?"


@torch.no_grad()
def check_kv_cache(ctx) -> tuple[bool, str, str, dict]:
    p, device, dtype = ctx.plan, ctx.device, ctx.dtype
    model = random_model(p["op_depth"], p["vocab_size"], p["seq_len"], device, dtype).eval()
    P, K = p["kv_prompt"], p["kv_new"]
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, p["vocab_size"], (P,), generator=gen).tolist()
    engine = Engine(model, NoSpecialTokens(p["vocab_size"]))
    rows, _ = generate_batch(engine, prompt, num_samples=2, max_tokens=K, temperature=0.0)
    tokens = rows[0]
    K = len(tokens) - P  # (no token can end a row early here, but count what came back)
    # The reference: one full forward over prompt + generated tokens, no cache.
    full = model(torch.tensor([tokens], device=device))[0, P - 1:-1]  # the logits that chose each new token
    # The same tokens fed through the decode cache one at a time (teacher forcing), as Engine decodes.
    cache = engine.new_cache(1, len(tokens))
    cache.rows = 1
    cached = [engine.forward(torch.tensor([prompt], device=device), cache, masked=False)[0]]
    for t in tokens[P:-1]:
        cached.append(engine.forward(torch.tensor([[t]], device=device), cache, masked=False)[0])
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
    """Batch-1 greedy decoding on the fast path (picochat.decode over prepared weights), eager and
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
    compiled.compiled = D.CompiledDecode(mode="reduce-overhead") if device.type == "cuda" \
        else D.CompiledDecode(backend="aot_eager")
    compiled.compiled_prefill = D.CompiledPrefill() if device.type == "cuda" else D.CompiledPrefill(backend="aot_eager")
    fast = eager.model

    def greedy(engine) -> list[int]:
        return [column[0] for column, _ in generate(engine, prompt, 1, max_tokens=tokens, temperature=0.0)]

    def steps_ms(engine) -> float:
        """ms per decode step on one cache kept across rounds, as the server keeps its own: a CUDA
        graph captured in the warm-up round replays on the same cache, never re-recorded."""
        cache = engine.new_cache(1, len(prompt) + tokens + 1)
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
                ids = engine.forward(ids.view(1, 1), cache, masked=True).argmax(dim=-1)
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
# The optimizer under a 1-rank process group

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
# Evaluation's peak memory

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
# FP8 matmuls (picochat/fp8.py)

FP8_TOLERANCE = dict(output=0.06, input_grad=0.09, weight_grad=0.09)  # relative; tests/test_fp8.py says why


def check_fp8(ctx) -> tuple[bool, str, str, dict]:
    p, device = ctx.plan, ctx.device
    supported, why = fp8_support(device)
    if not supported and not ctx.dry_run:
        raise Skip(why)
    cfg = config_from_depth(p["op_depth"], p["vocab_size"], p["seq_len"])
    N, d = p["op_rows"] * cfg.sequence_len, cfg.n_embd
    gen = torch.Generator(device=device).manual_seed(5)
    torch.manual_seed(5)
    mlp = M.MLP(cfg).to(device)  # fp32 master weights, as in training
    with torch.no_grad():
        for w in mlp.parameters():
            w.normal_(0.0, w.size(1) ** -0.5)
    fp8_mlp = copy.deepcopy(mlp)
    switched = enable_fp8(fp8_mlp)
    # 1. the MLP's first matmul: output and both gradients against fp64, in FP8 and in bf16
    layer, plain = fp8_mlp.c_fc, mlp.c_fc
    x = torch.randn(N, d, generator=gen, device=device).bfloat16()
    g = torch.randn(N, 4 * d, generator=gen, device=device).bfloat16()

    def output_and_grads(module):
        xr = x.clone().requires_grad_()
        module.weight.grad = None
        y = module(xr)
        y.backward(g)
        return y.detach(), xr.grad, module.weight.grad

    x64, w64, g64 = x.double(), plain.weight.double(), g.double()
    truth = (x64 @ w64.t(), g64 @ w64, g64.t() @ x64)
    fp8, bf16 = output_and_grads(layer), output_and_grads(plain)
    numbers, failed = dict(rows=N, width=d, switched=switched), []
    for name, got, ref, t in zip(FP8_TOLERANCE, fp8, bf16, truth):
        err, ref_err = rel_norm(got, t), rel_norm(ref, t)
        numbers[name] = dict(fp8_rel_err=err, bf16_rel_err=ref_err, tolerance=FP8_TOLERANCE[name])
        log(f"  {name:<12} relative error vs fp64: FP8 {err:.4f}, bf16 {ref_err:.4f} (tolerance {FP8_TOLERANCE[name]})")
        if not err < FP8_TOLERANCE[name]:
            failed.append(name)
    # 2. fp8_disabled: the bf16 forward, bit for bit
    with torch.no_grad(), fp8_disabled(fp8_mlp):
        same = torch.equal(fp8_mlp(x), mlp(x))
    restored = sum(type(m) is Float8Linear for m in fp8_mlp.modules()) == switched
    numbers.update(disabled_equals_bf16=same, switched_back=restored)
    if not (same and restored and switched == 2):
        failed.append("fp8_disabled")
    # 3. the MLP's forward + backward, FP8 against bf16 (compiled on the GPU, as base_train runs it)
    xin = torch.randn(N, d, generator=gen, device=device).bfloat16().requires_grad_()
    compiled = p["compile"] == "yes"
    timings = {}
    for label, module in (("bf16", mlp), ("fp8", fp8_mlp)):
        fn = torch.compile(module) if compiled else module
        timings[label] = median_ms(lambda: fn(xin).float().sum().backward(), device)
    speedup = timings["bf16"] / timings["fp8"]
    numbers.update(mlp_ms=timings, mlp_speedup=speedup, compiled=compiled, fp8_support=why)
    how = "compiled" if compiled else "eager (CPU reference _scaled_mm: the ratio means nothing)"
    log(f"  d{p['op_depth']} MLP forward + backward, {N} rows, {how}: bf16 {timings['bf16']:.2f} ms, "
        f"FP8 {timings['fp8']:.2f} ms ({speedup:.2f}x)")
    errs = ", ".join(f"{k} {numbers[k]['fp8_rel_err']:.3f}" for k in FP8_TOLERANCE)
    result = "within FP8 rounding; fp8_disabled gives bf16" if not failed else "out of tolerance: " + ", ".join(failed)
    return not failed, result, f"rel err {errs}; MLP {speedup:.2f}x bf16", numbers


# -----------------------------------------------------------------------------
# Real base_train processes

def child_env(home: Path) -> dict:
    env = dict(os.environ, PICOCHAT_HOME=str(home))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one plain process, not a torchrun rank
        env.pop(key, None)
    return env


def run_picochat(ctx, args: list[str], label: str, kill_marker: str | None = None) -> tuple[int, list[str]]:
    """Run `python3 -m picochat *args`, echoing its output as it comes. With kill_marker, SIGKILL
    it as soon as it prints that. Killed when --timeout or the time budget runs out. Returns
    (exit code, output lines)."""
    cmd = [sys.executable, "-m", "picochat", *args]
    log(f"  $ {' '.join(cmd[1:])}")
    limit = min(ctx.plan["timeout"], max(ctx.left(), 0) + BUDGET_GRACE_S)
    why = "--timeout" if limit == ctx.plan["timeout"] else "the time budget"
    timed_out, proc, lines = threading.Event(), None, []

    def on_timeout():  # a hung run must not hang the whole check
        timed_out.set()
        proc.kill()

    timer = threading.Timer(limit, on_timeout)
    timer.daemon = True  # a stopped run (SIGTERM) exits without waiting for it
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(ctx.home), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        timer.start()
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
        if proc is not None and proc.poll() is None:  # this script is being stopped: no orphan keeps the GPU
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        raise RuntimeError(f"{label}: no result after {limit:.0f} s ({why}); killed")
    return code, lines


SETTINGS = ("FLOPs per token", "total batch", "recipe", "optimizer", "iterations", "training FLOPs")


def parse_train_output(lines: list[str]) -> dict:
    """What base_train prints: its settings table, the memory estimate, one line per step with
    loss, ms, tok/s and MFU, and (on CUDA) the peak memory. Matched by those phrases, whatever
    else the lines say."""
    out = {"steps": [], "settings": {}}
    number = r"([-+\d.,]+|nan|inf)"
    for line in lines:
        if m := re.match(r"(" + "|".join(SETTINGS) + r")\s{2,}(.+)", line):
            out["settings"][m.group(1)] = m.group(2)
        elif m := re.search(r"memory estimate\D*?([\d.]+)\s*GiB", line):
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
               rows: int | None = None, accum: int = 1, eval_rows: int | None = None,
               extra: tuple[str, ...] = ()) -> list[str]:
    """base_train's flags for a short run: `accum` micro-batches of `rows` per step, no periodic
    eval or samples (base_train still evaluates val bpb once and samples once at the last step)."""
    p = ctx.plan
    T = seq_len or p["seq_len"]
    B = rows or ctx.rows
    return ["base_train", "--dataset", DATASET, "--depth", str(depth), "--max-seq-len", str(T),
            "--device-batch-size", str(B), "--total-batch-size", str(B * T * accum),
            "--num-iterations", str(steps), "--eval-every", "-1", "--eval-tokens", str((eval_rows or B) * T),
            "--sample-every", "-1", "--device", p["device"], "--dtype", ctx.dtype_name,
            "--compile", compile_mode, "--model-tag", tag, *extra]


class OutOfMemory(RuntimeError):
    pass


def final_val_bpb(home: Path, tag: str) -> float | None:
    path = Path(home) / "checkpoints" / "base" / tag / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return next((r["val_bpb"] for r in reversed(records) if "val_bpb" in r), None)


def train_run(ctx, depth: int, compile_mode: str, label: str, steps: int | None = None, **kwargs) -> dict:
    """One short base_train run (kwargs: train_args'); returns the parsed numbers and the final
    val bpb, and drops its multi-GiB checkpoint."""
    steps = steps or ctx.plan["steps"]
    tag = f"{label}_d{depth}"
    t0 = time.time()
    code, lines = run_picochat(ctx, train_args(ctx, depth, tag, compile_mode, steps, **kwargs), label=tag)
    wall = time.time() - t0
    val_bpb = final_val_bpb(ctx.home, tag)
    shutil.rmtree(Path(ctx.home) / "checkpoints" / "base" / tag, ignore_errors=True)
    if code != 0:
        error = OutOfMemory if any("out of memory" in line.lower() for line in lines[-40:]) else RuntimeError
        raise error(f"base_train d{depth} exited with code {code}: {lines[-1] if lines else ''}")
    parsed = parse_train_output(lines)
    done = [s["step"] for s in parsed["steps"]]
    if done != list(range(1, steps + 1)):
        raise RuntimeError(f"expected step lines 1..{steps}, parsed {done}")
    s = parsed["steps"]
    steady = s[2:] if len(s) > 2 else s[1:] or s  # the first steps include compilation and warm-up
    parsed.update(depth=depth, compile=compile_mode, wall_s=wall, compile_s=s[0]["ms"] / 1000,
                  tok_per_sec=statistics.median(x["tok_per_sec"] for x in steady),
                  mfu=statistics.median(x["mfu"] for x in steady),
                  first_loss=s[0]["loss"], last_loss=s[-1]["loss"], val_bpb=val_bpb,
                  trains=s[-1]["loss"] < s[0]["loss"] and all(math.isfinite(x["loss"]) for x in s))
    return parsed


def check_train(ctx, depth: int) -> tuple[bool, str, str, dict]:
    rows, accum = ctx.rows, ctx.plan["train_accum"]
    try:
        r = train_run(ctx, depth, ctx.plan["compile"], "train", rows=rows, accum=accum)
    except OutOfMemory as e:  # the preset's batch does not fit: say so, and measure at half the rows
        if ctx.args.device_batch_size or ctx.left() < ctx.estimate("train"):
            raise
        log(f"  out of memory at {rows} rows ({e}); again at {rows // 2} rows, {2 * accum} micro-batches per step")
        r = train_run(ctx, depth, ctx.plan["compile"], "train_half", rows=rows // 2, accum=2 * accum)
        r["out_of_memory_at_rows"] = rows
        rows //= 2
    r["rows"] = rows
    est, peak = r.get("memory_estimate_gib"), r.get("peak_memory_gib")
    if est is None:
        mem = "no memory estimate printed"
    elif peak is None:
        mem = f"estimate {est:.2f} GiB (no peak on {ctx.device.type})"
    else:
        r["estimate_error"] = est / peak - 1
        mem = f"peak {peak:.1f} GiB vs estimate {est:.1f} ({100 * r['estimate_error']:+.0f}%)"
    first = "compile (first step)" if r["compile"] == "yes" else "first step"
    oom = f" (out of memory at {r['out_of_memory_at_rows']} rows)" if "out_of_memory_at_rows" in r else ""
    log(f"  d{depth} at {rows} rows{oom}: {r['tok_per_sec']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, {first} "
        f"{r['compile_s']:.1f} s, {mem}, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, wall {r['wall_s']:.0f} s")
    if peak is not None and est:
        eval_est = r.get("eval_memory_estimate_gib")
        log(f"  peak / training estimate = {peak / est:.2f}" + (f", evaluation estimate {eval_est:.2f} GiB" if
            eval_est is not None else "") + " (the peak covers training, the final val eval and sampling)")
    needs_peak = ctx.device.type == "cuda"
    ok = r["trains"] and est is not None and (peak is not None or not needs_peak) and not oom
    result = ("ran, loss falls" if r["trains"] else "loss did not fall") + oom
    if est is None or (needs_peak and peak is None):
        result += "; memory lines missing"
    return ok, result, f"{rows} rows: {r['tok_per_sec']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, {first} " \
                       f"{r['compile_s']:.1f} s, {mem}", r


def base_train_flags(flags: list[str]) -> list[str]:
    """`flags` as this base_train takes them; Skip when it lacks one (a later change adds it)."""
    known = base_train_parser()._option_string_actions
    missing = [f for f in flags if f.startswith("--") and f not in known]
    if missing:
        raise Skip(f"base_train has no {', '.join(missing)} flag yet")
    if "--fp8" in flags and known["--fp8"].nargs != 0:  # --fp8 yes|no rather than a switch
        flags = [x for f in flags for x in ((f, "yes") if f == "--fp8" else (f,))]
    return flags


def check_recipe(ctx, name: str) -> tuple[bool, str, str, dict]:
    """One recipe at the recipe depth for the same tokens as the others; compared with its
    baseline (2026 with seed, FP8 with 2026) when that one ran."""
    if name == "recipe_fp8":
        supported, why = fp8_support(ctx.device)
        if not supported:
            raise Skip(why)
    flags = base_train_flags(RECIPE_FLAGS[name]) + ctx.plan["recipe"]["extra"]
    r = ctx.plan["recipe"]
    run = train_run(ctx, r["depth"], ctx.plan["compile"], name, steps=r["steps"], eval_rows=r["eval_rows"],
                    extra=tuple(flags))
    ctx.recipe_results[name] = run
    tokens = r["steps"] * ctx.rows * ctx.plan["seq_len"]
    bpb = run["val_bpb"]
    numbers = dict(run, flags=flags, tokens=tokens)
    summary = f"bpb {bpb:.4f}, {run['tok_per_sec']:,.0f} tok/s, MFU {100 * run['mfu']:.1f}%" if bpb is not None \
        else f"no val bpb, {run['tok_per_sec']:,.0f} tok/s"
    log(f"  d{r['depth']} {' '.join(flags)}, {tokens:,} tokens: {summary}; compile {run['compile_s']:.0f} s, "
        f"wall {run['wall_s']:.0f} s; {run['settings'].get('optimizer', '')}")
    ok = run["trains"] and bpb is not None and math.isfinite(bpb)
    result = "trains" if ok else "did not train (loss or val bpb)"
    base = ctx.recipe_results.get(RECIPE_BASELINE.get(name))
    if base is not None and base.get("val_bpb") and bpb is not None:
        numbers.update(baseline=RECIPE_BASELINE[name], bpb_change=bpb / base["val_bpb"] - 1,
                       tok_per_sec_ratio=run["tok_per_sec"] / base["tok_per_sec"])
        vs = f"{100 * numbers['bpb_change']:+.2f}% bpb, {numbers['tok_per_sec_ratio']:.2f}x tok/s " \
             f"vs {RECIPE_BASELINE[name].removeprefix('recipe_')}"
        log(f"  {name} against {RECIPE_BASELINE[name]} at equal tokens: bpb {base['val_bpb']:.4f} -> {bpb:.4f}, "
            f"tok/s {base['tok_per_sec']:,.0f} -> {run['tok_per_sec']:,.0f}")
        summary += f" ({vs})"
        if name == "recipe_fp8" and numbers["bpb_change"] > FP8_BPB_TOLERANCE:
            ok = False
            result = f"FP8 bpb {100 * numbers['bpb_change']:+.1f}% over bf16's (tolerance {FP8_BPB_TOLERANCE:.0%})"
    return ok, result, summary, numbers


def check_compile_vs_eager(ctx) -> tuple[bool, str, str, dict]:
    r, mode, steps = ctx.plan["recipe"], ctx.plan["compare_compile"], ctx.plan["steps"]
    try:
        flags = tuple(base_train_flags(RECIPE_FLAGS["recipe_2026"]) + r["extra"])  # as recipe_2026 ran
    except Skip:
        flags = ()  # an older base_train: its own default recipe
    compiled = ctx.recipe_results.get("recipe_2026")  # the recipe check's run, when it was compiled
    if compiled is None or compiled["compile"] != mode:
        compiled = train_run(ctx, r["depth"], mode, "compiled", steps=steps, extra=flags)
    eager = train_run(ctx, r["depth"], "no", "eager", steps=steps, extra=flags)
    ratio = compiled["tok_per_sec"] / eager["tok_per_sec"]
    numbers = dict(depth=r["depth"], compiled=compiled, eager=eager, speedup=ratio)
    note = "" if mode == "yes" else " (dry run: both eager)"
    log(f"  d{r['depth']}: compiled {compiled['tok_per_sec']:,.0f} tok/s, eager {eager['tok_per_sec']:,.0f} tok/s: "
        f"{ratio:.2f}x{note}")
    return eager["trains"], f"compiled/eager {ratio:.2f}x{note}", \
        f"{compiled['tok_per_sec']:,.0f} vs {eager['tok_per_sec']:,.0f} tok/s at d{r['depth']}", numbers


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
# Running the checks within the budget, and the report

class Context:
    """What every check reads: the plan, the device and dtype, the temporary PICOCHAT_HOME, the
    clock of the time budget, and the results later checks compare with."""

    def __init__(self, args, plan: dict, home: Path, start: float, budget_s: float):
        self.args, self.plan, self.home = args, plan, home
        self.start, self.budget_s = start, budget_s
        self.dry_run = args.cpu_dry_run
        # NCCL wants a device with an index; base_train's children get plain --device cuda (cuda:0)
        self.device = torch.device("cuda", 0) if plan["device"] == "cuda" else torch.device("cpu")
        self.dtype, self.dtype_name = torch.bfloat16, "bfloat16"
        self.depths = plan["depths"]
        self.rows = args.device_batch_size or plan["rows"]
        self.recipe_results: dict[str, dict] = {}
        self.pace = 1.0  # measured / estimated time of the last base_train check that passed
        self.run_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(start))  # marks this run's --out lines
        self.cuda_error: str | None = None  # set once this process's CUDA context is unusable

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def estimate(self, name: str) -> float:
        kind = check_kind(name)
        guess = self.plan["estimates"][kind]
        return guess if kind in IN_PROCESS else guess * self.pace


def check_kind(name: str) -> str:
    """The estimates' key of a check: train_d20 -> train, recipe_seed -> recipe."""
    return "train" if name.startswith("train_d") else "recipe" if name.startswith("recipe_") else name


def planned_checks(ctx, selected: list[str]) -> list[tuple[str, callable]]:
    checks = []
    for name in selected:
        if name == "train":
            checks += [(f"train_d{d}", lambda c, d=d: check_train(c, d)) for d in ctx.depths]
        elif name.startswith("recipe_"):
            checks.append((name, lambda c, n=name: check_recipe(c, n)))
        else:
            checks.append((name, globals()[f"check_{name}"]))
    return checks


def cuda_unusable(ctx) -> str | None:
    """After each check: the error that has left this process's CUDA context unusable (an illegal
    address, a device-side assert), or None when CUDA still works (its cached memory then freed).
    Never raises: this is the cleanup that must not fail after a CUDA error."""
    if ctx.device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()  # give the memory back before a base_train process needs it
        return None
    except Exception as e:  # noqa: BLE001 -- any error here means the context is gone
        return f"{type(e).__name__}: {e}".splitlines()[0][:160]


def append_record(path: str | None, record: dict) -> None:
    """One JSON line, appended and closed at once: a run killed a moment later keeps it."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def run_one(ctx, name: str, fn, inject_failure: str | None) -> dict:
    """Run one check unless it cannot fit the budget or cannot run here; never raises."""
    estimate, left = ctx.estimate(name), ctx.left()
    base = dict(check=name, estimate_s=round(estimate, 1), numbers_summary="", numbers={}, error=None, seconds=0.0)
    if name in IN_PROCESS and ctx.cuda_error:
        return dict(base, status="skip", result=f"skipped: CUDA in this process failed earlier ({ctx.cuda_error})")
    if estimate > left:
        return dict(base, status="skip", result=f"skipped: needs ~{estimate:.0f} s, {max(left, 0):.0f} s left "
                                                f"of the {ctx.budget_s / 60:g}-min budget (--budget)")
    t0 = time.time()
    try:
        if name == inject_failure:  # for tests: shows that a failing check fails the run
            raise RuntimeError("injected failure (--inject-failure)")
        ok, result, key, numbers = fn(ctx)
        record = dict(base, status="pass" if ok else "fail", result=result, numbers_summary=key, numbers=numbers)
    except Skip as e:
        record = dict(base, status="skip", result=f"skipped: {e}")
    except Exception as e:  # noqa: BLE001 -- one check's failure must not stop the others
        traceback.print_exc(file=sys.stdout)
        record = dict(base, status="fail", result=f"error: {type(e).__name__}: {e}".splitlines()[0][:120],
                      error=traceback.format_exc())
    ctx.cuda_error = ctx.cuda_error or cuda_unusable(ctx)  # also frees cached memory for the next base_train
    record["seconds"] = time.time() - t0
    if check_kind(name) not in IN_PROCESS and record["status"] == "pass":
        ctx.pace = max(record["seconds"] / ctx.plan["estimates"][check_kind(name)], 0.25)
    return record


def run_checks(ctx, checks, inject_failure: str | None) -> list[dict]:
    results = []
    for i, (name, fn) in enumerate(checks, 1):
        log(f"\n[{i}/{len(checks)}] {name} (~{ctx.estimate(name):.0f} s; "
            f"{max(ctx.left(), 0):.0f} s of the budget left)")
        record = run_one(ctx, name, fn, inject_failure)
        append_record(ctx.args.out, dict(record="check", run=ctx.run_id, **record))
        log(f"  -> {record['status'].upper()} in {record['seconds']:.1f} s: {record['result']}")
        results.append(record)
    return results


def format_table(results: list[dict]) -> str:
    rows = [("check", "result", "numbers", "time", "pass/fail")]
    rows += [(r["check"], r["result"], r["numbers_summary"], f"{r['seconds']:.0f} s", r["status"].upper())
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def recipe_table(results: dict[str, dict]) -> str | None:
    """The recipe runs side by side: what the GPU says about the CPU ablations."""
    if not results:
        return None
    lines = ["run          | val bpb | tok/s      | MFU   | compile"]
    for name, r in results.items():
        bpb = f"{r['val_bpb']:.4f}" if r.get("val_bpb") is not None else "-"
        lines.append(f"{name:<12} | {bpb:<7} | {r['tok_per_sec']:>10,.0f} | {100 * r['mfu']:4.1f}% | "
                     f"{r['compile_s']:.0f} s")
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Validate a GPU machine for picochat within a time budget: fused ops, head loss chunk "
                    "sizes, FP8 matmuls, sharded optimizer on NCCL, eval memory, the seed and 2026 recipes "
                    "and FP8 side by side at d12, base_train speed and memory at d20, KV cache, compile vs "
                    "eager, resume. The module docstring says what each check does and when it passes.")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every check's code path on this CPU with a tiny model (depth 2, vocab 512, "
                        "seq 64, 4 steps, gloo instead of NCCL, no compilation); default: off (CUDA)")
    p.add_argument("--out", metavar="FILE",
                   help="append one JSON line per finished check to FILE as it finishes, after a first line "
                        "with the device and versions and before a last one with the table (default: print only)")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="time budget: a check whose estimate does not fit the time left is skipped, and a "
                        "base_train run is killed 30 s past it (default: 8; --quick: 4)")
    p.add_argument("--quick", action="store_true",
                   help=f"a 4-minute budget and only {','.join(QUICK_CHECKS)} (correctness and the d20 "
                        "training measurement), for when GPU time is short")
    p.add_argument("--checks", default=None,
                   help=f"comma-separated checks to run, in this order (default: all: {','.join(CHECK_NAMES)}; "
                        "--quick: its list); 'train' is one run per --depths")
    p.add_argument("--depths", type=int_list, default=None,
                   help="base_train depths for the train checks (default: 20; --cpu-dry-run: 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per train and compile_vs_eager run (default: 10; --cpu-dry-run: 4)")
    p.add_argument("--recipe-steps", type=int, default=None,
                   help="steps of each recipe run, 32 rows of 2048 tokens each (default: 120; --cpu-dry-run: 4)")
    p.add_argument("--recipe-extra", default="", metavar="FLAGS",
                   help="more base_train flags for every recipe run, e.g. \"--muon-weight-decay 0.28 "
                        "--warmup-steps 5\" (default: none: each recipe's own values, which at this short "
                        "horizon include the 2026 warmup of 40 steps and a large horizon-scaled Muon decay)")
    p.add_argument("--device-batch-size", type=int, default=None,
                   help="rows per micro-batch in the base_train runs (default: 32, the presets'; "
                        "--cpu-dry-run: 4); the train check takes 2 micro-batches per step")
    p.add_argument("--op-depth", type=int, default=None,
                   help="model shapes for fused_ops, head_loss, fp8, kv_cache and eval_memory "
                        "(default: 20; --cpu-dry-run: 2)")
    p.add_argument("--head-chunks", type=int_list, default=None,
                   help="head_loss chunk sizes to compare and time (default: 256,512,1024,2048,4096,8192; "
                        "--cpu-dry-run: 16,32,64,128)")
    p.add_argument("--head-compiled", action="store_true",
                   help="also time head_loss(compiled=True), as base_train runs it on CUDA with --compile, "
                        "at each chunk size (one compilation per size: adds about a minute; default: off)")
    p.add_argument("--timeout", type=int, default=None,
                   help="seconds before a base_train process is killed, whatever the budget says "
                        "(default: 480; --cpu-dry-run: 300)")
    p.add_argument("--keep-home", action="store_true",
                   help="keep the temporary PICOCHAT_HOME (synthetic data, logs) and print where it is "
                        "(default: deleted at the end)")
    p.add_argument("--inject-failure", metavar="CHECK", help=argparse.SUPPRESS)  # for tests
    return p


def main(argv=None) -> int:
    start = time.time()
    args = build_parser().parse_args(argv)
    plan = copy.deepcopy(DRY_PLAN if args.cpu_dry_run else GPU_PLAN)
    for flag, key in (("depths", "depths"), ("steps", "steps"), ("op_depth", "op_depth"),
                      ("head_chunks", "head_chunks"), ("timeout", "timeout")):
        if getattr(args, flag) is not None:
            plan[key] = getattr(args, flag)
    if args.recipe_steps is not None:
        plan["recipe"]["steps"] = args.recipe_steps
    plan["recipe"]["extra"] = shlex.split(args.recipe_extra)
    checks = args.checks or ",".join(QUICK_CHECKS if args.quick else CHECK_NAMES)
    selected = [c.strip() for c in checks.split(",") if c.strip()]
    unknown = [c for c in selected if c not in CHECK_NAMES]
    if unknown:
        sys.stderr.write(f"gpu_check: unknown check(s) {unknown}; choose from {', '.join(CHECK_NAMES)}\n")
        return 2
    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: no CUDA GPU is visible; use --cpu-dry-run to try the checks on this CPU\n")
        return 2
    budget_min = args.budget if args.budget is not None else QUICK_BUDGET_MIN if args.quick else BUDGET_MIN

    # SIGTERM (a scheduler's time limit, `timeout`) unwinds like Ctrl-C: the running base_train is
    # killed and the temporary home deleted; what finished is already in --out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    home = Path(tempfile.mkdtemp(prefix="picochat_gpu_check_", dir=scratch_dir(args.cpu_dry_run)))
    ctx = Context(args, plan, home, start, 60 * budget_min)
    v = versions(ctx.device)
    name = v["device_name"] if ctx.device.type == "cuda" else "cpu (dry run)"
    log(f"gpu_check on {name}: torch {v['torch']} (CUDA {v['cuda']}), python {v['python']}, {ctx.dtype_name}; "
        f"budget {budget_min:g} min for {', '.join(selected)}; PICOCHAT_HOME={home}")
    if v["warning"]:
        log(f"WARNING: {v['warning']}")
    append_record(args.out, dict(record="run", run=ctx.run_id, device=name, versions=v, dry_run=args.cpu_dry_run,
                                 budget_s=ctx.budget_s, checks=selected, plan=plan))
    results = []
    try:
        t0 = time.time()
        sizes = write_synthetic_home(home, plan)
        log(f"synthetic tokenizer (vocab {plan['vocab_size']:,}) and Python-source dataset written in "
            f"{time.time() - t0:.1f} s: {sizes['train_chars'] / 1e6:.1f}M chars train, "
            f"{sizes['val_chars'] / 1e6:.2f}M val")
        results = run_checks(ctx, planned_checks(ctx, selected), args.inject_failure)
    finally:
        if args.keep_home:
            log(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    elapsed = time.time() - start

    recipes = recipe_table(ctx.recipe_results)
    if recipes:
        log(f"\nThe recipes at d{plan['recipe']['depth']}, equal tokens:\n{recipes}")
    table = format_table(results)
    failed = [r["check"] for r in results if r["status"] == "fail"]
    skipped = [r["check"] for r in results if r["status"] == "skip"]
    log(f"\n{table}\n")
    log(f"{sum(r['status'] == 'pass' for r in results)}/{len(results)} checks passed, {len(failed)} failed, "
        f"{len(skipped)} skipped, in {elapsed / 60:.1f} min (budget {budget_min:g})")
    if v["warning"]:
        log(f"WARNING: {v['warning']}")
    append_record(args.out, dict(record="summary", run=ctx.run_id, passed=not failed, failed=failed,
                                 skipped=skipped, elapsed_s=elapsed, table=table, recipes=recipes))
    if args.out:
        log(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
