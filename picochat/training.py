"""
Pieces every training stage shares (base_train, mid_train, sft): the batch arithmetic with its
error messages, LR, momentum and weight-decay schedules, the horizon and batch size derived from
the data (nanochat's 2026 recipe), memory estimate and automatic device batch size, and the
metrics.jsonl log that a resume truncates back to its checkpoint.

    python -m pytest -q tests/test_recipe_schedules.py    # the schedules and the batch-size rule
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from picochat.checkpoint import CorruptCheckpointError, all_ranks_ok, is_disk_full, list_steps, load_checkpoint
from picochat.common import PicochatError, atomic_write_text
from picochat.model import GPT
from picochat.ops import head_chunk_rows, head_loss


@dataclass
class BatchLayout:
    """How a step's tokens are split: rows per micro-batch, micro-batches per process, and what
    was adjusted to get there (printed before training)."""
    total_batch: int
    device_batch: int
    grad_accum: int
    notes: list[str]


def largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def default_rows_per_process(at_least: int, device_batch) -> int:
    """Rows per process for a default total batch that does not split evenly: the fewest rows, from
    `at_least` up, that still allow micro-batches of at least half the device batch (43 rows per
    process would force micro-batches of 1 row; 44 allow 22). 'auto' wants a power of two."""
    if device_batch == "auto":
        step = min(8, 1 << (at_least.bit_length() - 1))
        return -(-at_least // step) * step
    rows = at_least
    while largest_divisor_at_most(rows, device_batch) < min(rows, device_batch) // 2:
        rows += 1
    return rows


def batch_layout(total_batch: int, seq_len: int, world: int, device_batch, model: GPT, device,
                 dtype, total_is_default: bool = False) -> BatchLayout:
    """Split a step of `total_batch` tokens over `world` processes. device_batch is a maximum
    (or 'auto'): it is lowered to the largest size that divides the rows each process needs, so
    the defaults work at any number of processes. A total batch that does not split over the
    processes is an error, unless it is the stage's default, which is rounded up."""
    T, W, notes = seq_len, world, []
    if total_batch % T:
        raise PicochatError(f"--total-batch-size {total_batch} is not a multiple of --max-seq-len {T}; "
                            f"use a multiple such as {max(1, total_batch // T) * T}")
    rows_per_step = total_batch // T
    if rows_per_step % W:
        rounded = default_rows_per_process(-(-rows_per_step // W), device_batch) * W
        if not total_is_default:
            raise PicochatError(f"--total-batch-size {total_batch} gives {rows_per_step} rows of {T} tokens, "
                                f"which do not split over {W} processes; use a multiple of {T * W} "
                                f"(e.g. {rounded * T})")
        notes.append(f"total batch {total_batch:,} → {rounded * T:,} tokens: {rows_per_step} rows "
                     f"do not split over {W} processes")
        rows_per_step, total_batch = rounded, rounded * T
    per_process = rows_per_step // W
    if device_batch == "auto":
        device_batch = auto_device_batch_size(model, T, per_process, device, dtype, W)
    elif per_process % device_batch:
        lowered = largest_divisor_at_most(per_process, device_batch)
        notes.append(f"device batch {device_batch} → {lowered} rows: each process needs "
                     f"{per_process} rows per step")
        device_batch = lowered
    return BatchLayout(total_batch, device_batch, per_process // device_batch, notes)


def set_schedules(optimizer, lr_mult: float, momentum: float, muon_weight_decay: float | None = None) -> None:
    """This step's LR (initial_lr * lr_mult) for every group and momentum for every muon group; and
    the muon groups' weight decay when one is given (None leaves it as it is)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        if group["kind"] == "muon":
            group["momentum"] = momentum
            if muon_weight_decay is not None:
                group["weight_decay"] = muon_weight_decay


# -----------------------------------------------------------------------------
# Schedules (docs/DESIGN.md#schedules). Pretraining's LR follows the step count (its horizon is
# known); midtraining's and SFT's follow the fraction of the data mixture consumed.
# nanochat's 2026 recipe: warmup_steps=40, warmdown_ratio 0.65, final_lr_frac 0.05 (its autoresearch
# round 1), muon_momentum_with_warmdown, and cosine_weight_decay for Muon.

def lr_multiplier_by_step(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                          final_lr_frac: float, warmup_steps: int | None = None) -> float:
    """base_train: linear warmup, constant, then linear warmdown to final_lr_frac at the last step.
    The warmup is warmup_ratio of the steps, or `warmup_steps` steps when that is given."""
    if warmup_steps is not None and warmup_ratio > 0:
        raise ValueError(f"give the LR warmup as a ratio or in steps, not both (warmup_ratio={warmup_ratio}, "
                         f"warmup_steps={warmup_steps}); set warmup_ratio to 0")
    warmup = round(warmup_ratio * num_iterations) if warmup_steps is None else warmup_steps
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    left = (num_iterations - step) / warmdown
    return left + (1 - left) * final_lr_frac


def lr_multiplier_by_progress(progress: float, warmdown_ratio: float) -> float:
    """mid_train, sft: 1.0, then linear to 0 over the last `warmdown_ratio` of training
    (progress in [0, 1]: the fraction of the mixture, or of --num-iterations, done)."""
    if warmdown_ratio <= 0 or progress < 1 - warmdown_ratio:
        return 1.0
    return max(0.0, (1 - progress) / warmdown_ratio)


def muon_momentum(step: int) -> float:
    """0.85 → 0.95 linearly over the first 300 steps (docs/DESIGN.md#schedules)."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def muon_momentum_with_warmdown(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """nanochat's 2026 Muon momentum: 0.85 → 0.97 linearly over the first 400 steps, held, then over
    the LR warmdown (the last warmdown_ratio of the steps) linearly down to 0.90 at the last step.
    In a run too short to finish the rise first, the warmdown starts from wherever the rise is."""
    frac = min(step / 400, 1.0)
    momentum = (1 - frac) * 0.85 + frac * 0.97
    warmdown = round(warmdown_ratio * num_iterations)
    if warmdown > 0 and step > num_iterations - warmdown:
        done = min((step - (num_iterations - warmdown)) / warmdown, 1.0)
        momentum += (0.90 - momentum) * done
    return momentum


def cosine_weight_decay(step: int, num_iterations: int, weight_decay: float) -> float:
    """Muon weight decay from weight_decay at step 0 to 0 at the last step along half a cosine
    (nanochat: a decay ramped to zero beat a constant one; cosine replaced its first, linear ramp)."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * min(step / num_iterations, 1.0)))


# -----------------------------------------------------------------------------
# Horizon, total batch, LR and weight decay from the amount of data (nanochat's 2026 recipe). Its
# hyperparameters were tuned on a reference run (d12 at the same tokens-per-parameter ratio, batch
# 2^19 tokens) and carried to other sizes with three rules below. "Scaling params" count the block
# matrices and the head, not the embeddings (Kaplan-style: with those, its scaling-law fits were stable).

REF_BATCH = 2**19  # tokens per step of the reference run
BATCH_EXPONENT = 0.383  # Power Lines (arXiv 2505.13738): the best batch grows as tokens^0.383
REF_WEIGHT_DECAY = 0.28  # Muon weight decay tuned at the reference run


def horizon_tokens(ratio: float, transformer_matrices: int, lm_head: int) -> int:
    """Training tokens for a tokens-per-parameter `ratio` (nanochat 2026: 12) over the scaling
    params: the block matrices (gates included) plus the head's V·d weights."""
    return int(ratio * (transformer_matrices + lm_head))


def auto_total_batch(target_tokens: float, ref_tokens: float, ref_batch: int = REF_BATCH) -> int:
    """Tokens per step for a run of target_tokens: the reference batch scaled by
    (tokens/ref_tokens)^0.383, rounded to the nearest power of two (in log2)."""
    return 2 ** round(math.log2(ref_batch * (target_tokens / ref_tokens) ** BATCH_EXPONENT))


def batch_lr_scale(total_batch: int, ref_batch: int = REF_BATCH) -> float:
    """Multiplier for the learning rates tuned at ref_batch: sqrt(B/ref_batch) (the square-root
    rule for Adam-like optimizers; nanochat applies it to its AdamW and Muon groups)."""
    return math.sqrt(total_batch / ref_batch)


def scaled_weight_decay(total_batch: int, target_tokens: float, ref_tokens: float, ref_batch: int = REF_BATCH,
                        base: float = REF_WEIGHT_DECAY) -> float:
    """Muon weight decay that keeps the run's EMA timescale in epochs, B/(lr·wd·D), at the reference's
    (Wang & Aitchison, arXiv 2405.13698), with lr scaled by sqrt(B/ref_batch):
    base·sqrt(B/ref_batch)·(ref_tokens/target_tokens)."""
    return base * math.sqrt(total_batch / ref_batch) * (ref_tokens / target_tokens)


# -----------------------------------------------------------------------------
# Batch size and memory

def _static_bytes(model: GPT, world: int) -> float:
    """fp32 master weights and optimizer state (AdamW: two moments for embedding and head; Muon:
    one momentum per block matrix), the state sharded over ranks."""
    n = model.num_params()
    emb = model.config.vocab_size * model.config.n_embd
    return 4 * n + (8 * 2 * emb + 4 * (n - 2 * emb)) / world


def estimate_memory_gib(model: GPT, batch: int, seq_len: int, dtype: torch.dtype, world: int) -> float:
    """Rough peak memory of a training step per process: weights, gradients, optimizer state,
    activations saved for backward (~26·d values per token per layer, measured against torch's
    own accounting on d4-d12) and the fused head's chunk buffers (logits, their gradient, and the
    head's fp32 weight gradient)."""
    c = model.config
    elt = torch.tensor([], dtype=dtype).element_size()
    grads = 4 * model.num_params()
    acts = batch * seq_len * (c.n_layer * 26 * c.n_embd * elt + 8 * c.n_embd)
    head = head_chunk_rows(model.lm_head.weight.device) * c.vocab_size * (3 * 4 + elt) + 2 * 4 * c.vocab_size * c.n_embd
    return (_static_bytes(model, world) + grads + acts + head) / 2**30


def estimate_eval_memory_gib(model: GPT, batch: int, seq_len: int, dtype: torch.dtype, world: int) -> float:
    """Rough peak memory of a validation pass in the middle of training: weights and optimizer
    state stay, gradients are freed, nothing is saved for backward (the widest live activations
    are ~12·d values per token), and the head runs in chunks (logits and log-softmax in fp32)."""
    c = model.config
    elt = torch.tensor([], dtype=dtype).element_size()
    acts = batch * seq_len * (12 * c.n_embd * elt + 3 * 4)
    head = head_chunk_rows(model.lm_head.weight.device) * c.vocab_size * (2 * 4 + elt) + elt * c.vocab_size * c.n_embd
    return (_static_bytes(model, world) + acts + head) / 2**30


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
        chosen = next((b for b in fitting if b <= 32), fitting[-1])
    else:
        chosen = next((b for b in fitting if try_step(model, b, seq_len, device)), 0)
    # Every rank must run the same layout: take the smallest choice (all are powers of two that
    # divide the rows, so the smallest divides them too). 0 means nothing fit somewhere.
    if dist.is_initialized():
        agreed = torch.tensor(chosen, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        chosen = int(agreed.item())
    if chosen == 0:
        raise PicochatError("even a device batch of 1 row does not fit in GPU memory; lower --max-seq-len or --depth")
    return chosen


# -----------------------------------------------------------------------------
# Resume

def check_shared_checkpoint_dir(root: Path, device) -> None:
    """Every rank writes its part of a checkpoint into one directory, so on several nodes
    $PICOCHAT_HOME must be on a filesystem they all share. Checked before training, not at the
    first save hours later: rank 0 writes a token there and every rank must read it back."""
    if not dist.is_initialized():
        return
    import secrets
    token = [secrets.token_hex(8) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0, device=device if device.type == "cuda" else None)
    probe = root / ".shared-check"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, token[0])
    dist.barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    missing = torch.tensor([0 if seen else 1], device=device)
    dist.all_reduce(missing)
    dist.barrier()
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    if missing.item():
        raise PicochatError(f"{missing.item()} of {dist.get_world_size()} processes cannot see the checkpoint "
                            f"directory {root} as rank 0 wrote it: on several nodes, put PICOCHAT_HOME on a "
                            f"filesystem that every node shares (docs/GPU.md)")


def load_for_resume(ckpt_root: Path, resume: bool, resume_if_possible: bool, rank: int, layout: dict):
    """The newest intact checkpoint to continue from, as (step, meta, model_state, rank_state), or
    None for a fresh start. A checkpoint with a missing, truncated or altered file is skipped with
    one line saying why (every rank skips the same ones); if none is intact, a one-line error.
    `layout` lists what must match (model config, processes, batch sizes): the data order and
    optimizer shards are only exact under the same layout."""
    steps = list_steps(ckpt_root)
    if not resume and not (resume_if_possible and steps):
        return None
    if not steps:
        raise PicochatError(f"--resume: no checkpoint in {ckpt_root}; run without --resume first")
    first_reason = None
    for step in reversed(steps):
        error = None
        try:
            # into host memory: the model and optimizer copy what they need to the device, and the
            # caller drops these, so no second copy of the weights stays on the GPU for the whole run
            model_state, meta, rank_state = load_checkpoint(ckpt_root, step, "cpu", rank=rank)
        except CorruptCheckpointError as e:
            error = e
        if all_ranks_ok(error is None):
            break
        model_state = meta = rank_state = None
        reason = str(error) if error is not None else "another process found its part of it corrupt"
        first_reason = first_reason or reason
        if error is not None or rank == 0:
            print(f"--resume: skipping checkpoint step {step}: {reason}", flush=True)
    else:
        raise PicochatError(f"--resume: none of the {len(steps)} checkpoint(s) in {ckpt_root} is intact "
                            f"(newest: {first_reason}); start a new run without --resume")
    for key, value in layout.items():
        saved = meta.get(key)
        if key == "model_config" and isinstance(saved, dict):  # written before a field existed: its default
            from picochat.model import GPTConfig
            try:
                saved = GPTConfig(**saved).to_dict()
            except (TypeError, ValueError):
                pass
        if saved != value:
            raise PicochatError(f"--resume: the checkpoint has {key} {meta.get(key)}, this run {value}; "
                                f"resume with the same settings, or start a new --model-tag")
    return step, meta, model_state, rank_state


# -----------------------------------------------------------------------------
# metrics.jsonl: one JSON object per step, next to the checkpoints

def append_metrics(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        if is_disk_full(e):
            raise PicochatError(f"no space left on {path.parent}'s filesystem while appending to {path.name}; "
                                f"free space and resume with --resume") from None
        raise


def _metric_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every line of metrics.jsonl that is a JSON object with an integer step.
    Any other line (the torn last line of a write cut short by a crash or a full disk) is dropped
    with a warning rather than failing the resume."""
    kept = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                raise ValueError("not a record with an integer step")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            print(f"warning: {path} line {lineno} is unreadable ({type(e).__name__}; a write cut short?); "
                  f"dropping it", flush=True)
            continue
        kept.append((line, record))
    return kept


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after `step` (a resumed run writes them again), and unreadable ones."""
    if path.exists():
        kept = [line for line, record in _metric_lines(path) if record["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def run_is_complete(path: Path, step: int, final_metric: str = "val_bpb") -> bool:
    """True when the last readable line is the final step with its evaluation (`final_metric`):
    nothing is left to do."""
    if not path.exists():
        return False
    records = [record for _, record in _metric_lines(path)]
    return bool(records) and records[-1].get("step") == step and final_metric in records[-1]
