"""
Pieces every training stage shares (base_train, mid_train, sft): the batch arithmetic with its
error messages, LR and momentum schedules, memory estimate and automatic device batch size, and
the metrics.jsonl log that a resume truncates back to its checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from picochat.checkpoint import latest_step, load_checkpoint
from picochat.common import PicochatError, atomic_write_text
from picochat.model import GPT, head_loss


def batch_layout(total_batch: int, seq_len: int, world: int, device_batch, model: GPT, device,
                 dtype) -> tuple[int, int]:
    """(device batch, grad accumulation) for a total batch of tokens; device_batch may be 'auto'."""
    T, W = seq_len, world
    if total_batch % T:
        raise PicochatError(f"--total-batch-size {total_batch} is not a multiple of --max-seq-len {T}; "
                            f"use a multiple such as {max(1, total_batch // T) * T}")
    rows_per_step = total_batch // T
    if rows_per_step % W:
        raise PicochatError(f"--total-batch-size {total_batch} gives {rows_per_step} rows of {T} tokens, "
                            f"which do not split over {W} processes; use a multiple of {T * W}")
    if device_batch == "auto":
        device_batch = auto_device_batch_size(model, T, rows_per_step // W, device, dtype, W)
    if (rows_per_step // W) % device_batch:
        tokens = device_batch * T * W
        raise PicochatError(
            f"--total-batch-size {total_batch} is not divisible by device batch {device_batch} × seq len "
            f"{T} × {W} process(es) = {tokens} tokens; use a multiple of {tokens} "
            f"(e.g. {max(1, total_batch // tokens) * tokens}) or a smaller --device-batch-size")
    return device_batch, rows_per_step // W // device_batch


def set_schedules(optimizer, lr_mult: float, momentum: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        if group["kind"] == "muon":
            group["momentum"] = momentum


# -----------------------------------------------------------------------------
# Schedules (spec §2.1)

def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 → 0.95 linearly over the first 300 steps (spec §2.1)."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# -----------------------------------------------------------------------------
# Batch size and memory

def estimate_memory_gib(model: GPT, batch: int, seq_len: int, dtype: torch.dtype, world: int) -> float:
    """Rough training memory per process: fp32 weights and grads, optimizer state (sharded over
    ranks), and activations (~26·d values per token per layer saved for backward, measured against
    torch's own accounting on d4-d12)."""
    c = model.config
    n = model.num_params()
    elt = torch.tensor([], dtype=dtype).element_size()
    weights = 4 * n * 2
    emb = c.vocab_size * c.n_embd
    optim = (8 * 2 * emb + 4 * (n - 2 * emb)) / world
    acts = batch * seq_len * (c.n_layer * 26 * c.n_embd * elt + 8 * c.n_embd)
    logits_chunk = 2048 * c.vocab_size * 4 * 4
    return (weights + optim + acts + logits_chunk) / 2**30


def available_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return info["MemAvailable"] / 2**20
    except (OSError, KeyError):
        return 8.0


def try_step(model: GPT, batch: int, seq_len: int, device) -> bool:
    """One forward+backward at this batch size; False on out-of-memory."""
    try:
        x = torch.zeros((batch, seq_len), dtype=torch.long, device=device)
        head_loss(model.trunk(x), model.lm_head.weight, x).backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def auto_device_batch_size(model: GPT, seq_len: int, rows_per_step: int, device, dtype, world) -> int:
    """Largest power of two that divides the rows each process needs per step and fits in memory
    (estimated on CPUs, capped at 32 where bigger stops paying; probed with real steps on GPUs)."""
    candidates = [b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if rows_per_step % b == 0]
    budget = available_memory_gib(device) * (0.9 if device.type == "cuda" else 0.6)
    fitting = [b for b in candidates if estimate_memory_gib(model, b, seq_len, dtype, world) <= budget] or [1]
    if device.type != "cuda":
        return next((b for b in fitting if b <= 32), fitting[-1])
    for b in fitting:
        if try_step(model, b, seq_len, device):
            return b
    raise PicochatError("even a device batch of 1 row does not fit in GPU memory; lower --max-seq-len or --depth")


# -----------------------------------------------------------------------------
# Resume

def load_for_resume(ckpt_root: Path, resume: bool, resume_if_possible: bool, device, rank: int,
                    layout: dict):
    """The latest checkpoint to continue from, as (step, meta, model_state, rank_state), or None
    for a fresh start. `layout` lists what must match (model config, processes, batch sizes):
    the data order and optimizer shards are only exact under the same layout."""
    step = latest_step(ckpt_root)
    if not resume and not (resume_if_possible and step is not None):
        return None
    if step is None:
        raise PicochatError(f"--resume: no checkpoint in {ckpt_root}; run without --resume first")
    model_state, meta, rank_state = load_checkpoint(ckpt_root, step, device, rank=rank)
    for key, value in layout.items():
        if meta.get(key) != value:
            raise PicochatError(f"--resume: the checkpoint has {key} {meta.get(key)}, this run {value}; "
                                f"resume with the same settings, or start a new --model-tag")
    return step, meta, model_state, rank_state


# -----------------------------------------------------------------------------
# metrics.jsonl: one JSON object per step, next to the checkpoints

def append_metrics(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after `step` (a resumed run writes them again)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def run_is_complete(path: Path, step: int) -> bool:
    """True when the last line is the final step with its evaluation: nothing is left to do."""
    if not path.exists():
        return False
    lines = path.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("step") == step and "val_bpb" in json.loads(lines[-1])
