"""
Checkpoints that are never half-written, never run code, and are checked before they are used.

A checkpoint is a directory `checkpoints/<stage>/<tag>/step_NNNNNN/` holding
  model.pt          the model state dict (rank 0)
  rank_R.pt         per-rank state: optimizer shard, data-loader position, RNG (every rank)
  meta.json         step, model config, the run's flags, loop state, and "files": the size and
                    sha256 of every other file (rank 0, written last); "meta_sha256" checks meta.json itself
It is first written as `step_NNNNNN.tmp/` and renamed once every rank has written and fsynced its
files, so a directory under its final name is always complete. `latest_step` only ever sees those.
Each rank hashes the file it wrote and leaves the digest beside it (`rank_R.pt.sha256`); rank 0
folds those into the manifest, so no collective is needed to carry them.

Loading: every file is checked against the manifest (size, then sha256) before torch.load, and
torch.load always runs with weights_only=True (tensors and plain containers only; a pickle that
would build any other object is refused, never run). A missing, truncated or altered file is a
one-line CorruptCheckpointError naming it; `training.load_for_resume` then falls back to the
previous checkpoint. Hashing costs one extra read of each file (~1.4 GB/s per core here).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from picochat.common import (PicochatError, atomic_path, atomic_write_text, check_model_tag, checkpoint_dir,
                             dist_info, fsync_dir, picochat_home)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
FILES_KEY, META_SUM_KEY = "files", "meta_sha256"  # meta.json keys that belong to the checkpoint format


class CorruptCheckpointError(PicochatError, ValueError):
    """A file of a checkpoint is missing, truncated, altered or not plain tensor data.
    (A ValueError too, like the JSON errors that callers of load_meta already handle.)"""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank (a collective: call it on all ranks).
    Lets every process take the same branch after a step that can fail on only some of them."""
    if not dist.is_initialized():
        return ok
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def _meta_digest(meta: dict) -> str:
    """sha256 of meta as JSON with sorted keys (what json.loads gives back, so a reload recomputes it)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _torch_save(obj, path: Path) -> None:
    # through a Python file object: a full disk then raises OSError(ENOSPC), where torch's own
    # file writer says only "unexpected pos"
    with atomic_path(path) as p, open(p, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # the zip writer's cleanup can mask the OSError it ran into
            cause = e.__cause__ or e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            raise


# -----------------------------------------------------------------------------
# Saving

def save_checkpoint(root: Path, step: int, model_state: dict, meta: dict, rank_state: dict,
                    keep_last: int | None = None) -> Path:
    """Write one checkpoint from every rank (call on all ranks); returns its final directory.
    If any rank fails to write (a full disk), the partial step_N.tmp/ is removed, earlier
    checkpoints are untouched, and every rank raises PicochatError."""
    info = dist_info()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")

    def phase(fn):
        error = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every rank must learn of it before anyone moves on
            error = e
        if not all_ranks_ok(error is None):
            if info.is_master:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None and not isinstance(error, OSError):
                raise error
            if error is None:
                raise PicochatError(f"checkpoint step {step} was not saved: another process could not write "
                                    f"its part to {tmp} (see its error); the previous checkpoint is intact")
            if is_disk_full(error):
                raise PicochatError(f"no space left on {root}'s filesystem: checkpoint step {step} was not saved "
                                    f"(partial files removed; the previous checkpoint is intact); free space "
                                    f"and resume with --resume") from None
            raise PicochatError(f"could not save checkpoint step {step} to {root}: "
                                f"{error.strerror or error}; the previous checkpoint is intact") from None

    def prepare():
        if info.is_master:
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from a crash mid-save
            tmp.mkdir(parents=True)

    def write_parts():
        name = f"rank_{info.rank}.pt"
        _torch_save(rank_state, tmp / name)
        atomic_write_text(tmp / f"{name}.sha256", json.dumps(_file_entry(tmp / name)))
        if info.is_master:
            _torch_save(model_state, tmp / "model.pt")

    def finish():
        if not info.is_master:
            return
        files = {"model.pt": _file_entry(tmp / "model.pt")}
        for r in range(info.world_size):
            side = tmp / f"rank_{r}.pt.sha256"
            files[f"rank_{r}.pt"] = json.loads(side.read_text())
        out = json.loads(json.dumps({k: v for k, v in meta.items() if k not in (FILES_KEY, META_SUM_KEY)},
                                    default=str))
        out[FILES_KEY] = files
        out[META_SUM_KEY] = _meta_digest(out)
        with atomic_path(tmp / "meta.json") as p:  # last: the manifest covers every other file
            p.write_text(json.dumps(out, indent=2))
        for r in range(info.world_size):
            (tmp / f"rank_{r}.pt.sha256").unlink()
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)

    phase(prepare)
    phase(write_parts)
    phase(finish)
    if info.is_master and keep_last:  # only once the new checkpoint is complete
        for old in list_steps(root)[:-keep_last]:
            shutil.rmtree(step_dir(root, old), ignore_errors=True)
    _barrier()
    return final


# -----------------------------------------------------------------------------
# Loading

def list_steps(root: Path) -> list[int]:
    """The steps saved under root: directories named step_NNNNNN (a stray file of that name is not one)."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def latest_step(root: Path) -> int | None:
    steps = list_steps(root)
    return steps[-1] if steps else None


def _read_meta(d: Path) -> tuple[dict, dict | None]:
    """(meta, files manifest or None for a checkpoint written before manifests), meta.json verified."""
    path = d / "meta.json"
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
        want = meta.pop(META_SUM_KEY, None) if isinstance(meta, dict) else None
        altered = want is not None and want != _meta_digest(meta)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; 100,000 '[' nest too deep
        raise CorruptCheckpointError(f"{path} is not valid JSON ({type(e).__name__}): the checkpoint is corrupt") from None
    except OSError as e:
        raise CorruptCheckpointError(f"{path} cannot be read ({e.strerror or e}): the checkpoint is unusable") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{path} is not a JSON object: the checkpoint is corrupt")
    if altered:
        raise CorruptCheckpointError(f"{path} does not match its checksum: the file was altered or corrupted")
    # What later becomes part of a path must be what a command line may give: a name, the step of
    # the directory it lives in (a forger can recompute the checksum, so these are checked here).
    tag, step = meta.get("model_tag"), meta.get("step")
    if tag is not None:
        try:
            check_model_tag(tag, "its model_tag")
        except PicochatError as e:
            raise CorruptCheckpointError(f"{path}: {e}; the checkpoint is not usable") from None
    if step is not None and (type(step) is not int or d.name != f"step_{step:06d}"):
        raise CorruptCheckpointError(f"{path} says step {repr(step)[:40]} but lives in {d.name}: the checkpoint is "
                                     f"corrupt")
    files = meta.pop(FILES_KEY, None)
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
            for e in files.values())):
        raise CorruptCheckpointError(f"{path} has a malformed \"files\" manifest: the checkpoint is corrupt")
    return meta, files


def load_meta(root: Path, step: int) -> dict:
    """meta.json of a checkpoint (checked against its own checksum; the other files are not read).
    FileNotFoundError when there is no such step (e.g. pruned), as before checksums."""
    d = step_dir(root, step)
    if not d.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no checkpoint", str(d))
    return _read_meta(d)[0]


def _verify(path: Path, entry: dict | None) -> None:
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} is missing: the checkpoint is incomplete")
    if entry is None:
        return  # a checkpoint from before manifests: nothing to compare with
    size = path.stat().st_size
    if size != entry["size"]:
        raise CorruptCheckpointError(f"{path} is {size} bytes but was saved as {entry['size']}: truncated or replaced")
    if sha256_file(path) != entry["sha256"]:
        raise CorruptCheckpointError(f"{path} does not match its sha256 in meta.json: the file is corrupt")


def _load_tensors(path: Path, map_location):
    """torch.load with weights_only=True: tensors and plain containers, never code."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CorruptCheckpointError(f"{path} holds objects other than tensors and plain data; refused "
                                     f"(loading it could run code)") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ValueError... on bad files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpointError(f"{path} is not a readable torch file ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{path} does not hold a dict: the checkpoint is corrupt")
    _refuse_unusual_tensors(obj, path)
    return obj


def _refuse_unusual_tensors(obj, path: Path) -> None:
    """Every tensor in obj must be dense (strided, not quantized or nested). weights_only still
    rebuilds sparse tensors, unchecked: a sparse weight with an index of 2**40 loads, then fails deep
    in copy_ (or, used as it is, reads out of bounds). Walked without recursion, each container once
    (a pickle can nest 100,000 deep, or hold a list that contains itself)."""
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.layout is not torch.strided or x.is_quantized or x.is_nested:
                kind = "quantized" if x.is_quantized else "nested" if x.is_nested else str(x.layout).replace("torch.", "")
                raise CorruptCheckpointError(f"{path} holds a {kind} tensor; only dense tensors are loaded "
                                             f"(refused: the checkpoint is corrupt or hostile)")
        elif isinstance(x, (dict, list, tuple, set)) and id(x) not in seen:
            seen.add(id(x))
            stack.extend(x.values() if isinstance(x, dict) else x)


def load_checkpoint(root: Path, step: int, device, rank: int | None = None):
    """Returns (model_state, meta, rank_state); rank_state is None when rank is None.
    Every file read is verified first; a bad one raises CorruptCheckpointError naming it."""
    d = step_dir(root, step)
    if not d.is_dir():
        raise PicochatError(f"no checkpoint at {d}")
    meta, files = _read_meta(d)
    if files is None:
        print(f"warning: {d} has no checksums (saved by an older picochat); loading it unverified",
              file=sys.stderr, flush=True)
    else:
        if "model.pt" not in files:
            raise CorruptCheckpointError(f"{d / 'meta.json'} lists no model.pt: the checkpoint is corrupt")
    _verify(d / "model.pt", files and files["model.pt"])
    model_state = _load_tensors(d / "model.pt", device)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model_state.items()):
        raise CorruptCheckpointError(f"{d / 'model.pt'} is not a state dict of tensors: the checkpoint is corrupt")
    rank_state = None
    if rank is not None:
        name = f"rank_{rank}.pt"
        saved_ranks = (sum(1 for n in files if n.startswith("rank_")) if files is not None
                       else meta.get("world_size", "?"))
        if (name not in files) if files is not None else not (d / name).exists():
            raise PicochatError(f"checkpoint {d} was written by {saved_ranks} "
                                f"process(es) and has no state for rank {rank}; resume with the "
                                f"same number of processes")
        _verify(d / name, files and files[name])
        rank_state = _load_tensors(d / name, "cpu")
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
    and meta["step"] are the checkpoint directory's tag and step. With `tokenizer`,
    first checks that the model was trained with a tokenizer of its vocabulary size."""
    from picochat.model import GPT, GPTConfig
    root = resolve_model_dir(stage, model_tag)
    step = latest_step(root) if step is None else step
    model_state, meta, _ = load_checkpoint(root, step, device)
    # The tag and step are those of the directory: what callers build output paths from
    # (meta.json's own were checked to agree with a name and this step, or are absent).
    meta["model_tag"], meta["step"] = root.name, step
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{step_dir(root, step) / 'meta.json'} has no usable model_config "
                                     f"({type(e).__name__}: {str(e)[:120]}): the checkpoint is corrupt") from None
    if tokenizer is not None and config.vocab_size != tokenizer.vocab_size:
        raise PicochatError(f"the model has vocab {config.vocab_size} but the tokenizer "
                            f"{tokenizer.vocab_size}; was the tokenizer retrained after training?")
    dtype = compute_dtype or getattr(torch, str(meta.get("compute_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"{step_dir(root, step) / 'meta.json'} has compute_dtype "
                                     f"{repr(meta.get('compute_dtype'))[:40]}, not a torch dtype: the checkpoint is corrupt")
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()  # recompute the rotary buffers; weights are overwritten next
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:  # missing or unexpected keys, other shapes than model_config makes
        first = (str(e).strip().splitlines() or [""])[-1].strip()[:160]
        raise CorruptCheckpointError(f"{step_dir(root, step) / 'model.pt'} does not fit its model_config "
                                     f"({first}): the checkpoint is corrupt") from None
    model.eval()
    return model, meta
