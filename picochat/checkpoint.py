"""
Checkpoints that are never half-written.

A checkpoint is a directory `checkpoints/<stage>/<tag>/step_NNNNNN/` holding
  model.pt          the model state dict (rank 0)
  meta.json         step, model config, the run's flags, loop state (rank 0)
  rank_R.pt         per-rank state: optimizer shard, data-loader position, RNG (every rank)
It is first written as `step_NNNNNN.tmp/` and renamed once every rank has written and fsynced its
files, so a directory under its final name is always complete. `latest_step` only ever sees those.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from picochat.common import PicochatError, atomic_path, checkpoint_dir, dist_info, fsync_dir, picochat_home

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: Path, step: int, model_state: dict, meta: dict, rank_state: dict,
                    keep_last: int | None = None) -> Path:
    """Write one checkpoint from every rank (call on all ranks); returns its final directory."""
    info = dist_info()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if info.is_master:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a crash mid-save
        tmp.mkdir(parents=True)
    _barrier()
    with atomic_path(tmp / f"rank_{info.rank}.pt") as p:
        torch.save(rank_state, p)
    if info.is_master:
        with atomic_path(tmp / "model.pt") as p:
            torch.save(model_state, p)
        with atomic_path(tmp / "meta.json") as p:
            p.write_text(json.dumps(meta, indent=2, default=str))
    _barrier()
    if info.is_master:
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if keep_last:
            for old in list_steps(root)[:-keep_last]:
                shutil.rmtree(step_dir(root, old), ignore_errors=True)
    _barrier()
    return final


def list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))


def latest_step(root: Path) -> int | None:
    steps = list_steps(root)
    return steps[-1] if steps else None


def load_meta(root: Path, step: int) -> dict:
    return json.loads((step_dir(root, step) / "meta.json").read_text())


def load_checkpoint(root: Path, step: int, device, rank: int | None = None):
    """Returns (model_state, meta, rank_state); rank_state is None when rank is None."""
    d = step_dir(root, step)
    if not (d / "model.pt").exists():
        raise PicochatError(f"no checkpoint at {d}")
    model_state = torch.load(d / "model.pt", map_location=device, weights_only=True)
    meta = json.loads((d / "meta.json").read_text())
    rank_state = None
    if rank is not None:
        path = d / f"rank_{rank}.pt"
        if not path.exists():
            raise PicochatError(f"checkpoint {d} was written by {meta.get('world_size', '?')} "
                                f"process(es) and has no state for rank {rank}; resume with the "
                                f"same number of processes")
        rank_state = torch.load(path, map_location="cpu", weights_only=False)
    return model_state, meta, rank_state


def resolve_model_dir(stage: str, model_tag: str | None) -> Path:
    """The checkpoint directory of a stage; with no tag, the only one there (never a guess)."""
    if model_tag:
        root = checkpoint_dir(stage, model_tag)
        if latest_step(root) is None:
            raise PicochatError(f"no {stage} checkpoint with tag {model_tag!r} in {root}")
        return root
    base = picochat_home() / "checkpoints" / stage
    tags = sorted(p.name for p in base.iterdir() if p.is_dir() and list_steps(p)) if base.is_dir() else []
    if not tags:
        raise PicochatError(f"no {stage} checkpoints in {base}; train one first")
    if len(tags) > 1:
        raise PicochatError(f"several {stage} models in {base} ({', '.join(tags)}); pick one with --model-tag")
    return base / tags[0]


def load_model(stage: str, model_tag: str | None, device, step: int | None = None,
               compute_dtype: torch.dtype | None = None, tokenizer=None):
    """Build a GPT from a checkpoint for inference/eval. Returns (model, meta); meta["model_tag"]
    is the checkpoint's tag. With `tokenizer`,
    first checks that the model was trained with a tokenizer of its vocabulary size."""
    from picochat.model import GPT, GPTConfig
    root = resolve_model_dir(stage, model_tag)
    step = latest_step(root) if step is None else step
    model_state, meta, _ = load_checkpoint(root, step, device)
    meta.setdefault("model_tag", root.name)  # checkpoints from before meta stored it: the directory is the tag
    config = GPTConfig(**meta["model_config"])
    if tokenizer is not None and config.vocab_size != tokenizer.vocab_size:
        raise PicochatError(f"the model has vocab {config.vocab_size} but the tokenizer "
                            f"{tokenizer.vocab_size}; was the tokenizer retrained after training?")
    dtype = compute_dtype or getattr(torch, meta.get("compute_dtype", "float32"))
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()  # recompute the rotary buffers; weights are overwritten next
    model.load_state_dict(model_state)
    model.eval()
    return model, meta
