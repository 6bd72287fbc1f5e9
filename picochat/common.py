"""
Shared plumbing: paths under PICOCHAT_HOME, user-facing errors, device and dtype choice,
torch.distributed setup, seeding, atomic file writes, progress bars, terminal colours and peak-FLOPs
numbers for MFU.

Nothing here knows about models or data; every other module may import it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# Errors for people

class PicochatError(Exception):
    """A mistake the user can fix. The CLI prints it as one line (no traceback) and exits 2."""


# -----------------------------------------------------------------------------
# Paths

def picochat_home() -> Path:
    """Where artifacts live: data/, tokenizer/, checkpoints/, evals/, report/."""
    return Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()


def data_dir(dataset: str) -> Path:
    return picochat_home() / "data" / dataset


def tokenizer_dir() -> Path:
    return picochat_home() / "tokenizer"


@dataclass(frozen=True)
class TrainingStage:
    """One training stage. Its checkpoints live in checkpoints/<name>/<tag>; `command` runs it
    (checkpoint folders are named after the model a stage produces, commands after what they do: the
    two differ for pretraining and midtraining); `starts_from` lists the stages whose checkpoints it
    may start from; `title` and `column` are its section and column in the report card."""
    name: str
    command: str
    starts_from: tuple[str, ...]
    title: str
    column: str


# The one list of training stages, in pipeline order.
TRAINING_STAGES = {stage.name: stage for stage in (
    TrainingStage("base", "base_train", (), "Base model training", "BASE"),
    TrainingStage("mid", "mid_train", ("base", "mid", "sft"), "Midtraining", "MID"),
    TrainingStage("sft", "sft", ("mid", "base", "sft"), "SFT", "SFT"),
    TrainingStage("rl", "rl", ("sft", "mid", "rl", "base"), "Reinforcement learning", "RL"),
)}
COMMAND_OF_STAGE = {name: stage.command for name, stage in TRAINING_STAGES.items()}


MODEL_TAG = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")  # fullmatch: one path component, never "." or ".."


def check_model_tag(tag, what: str = "model tag") -> str:
    """A model tag names a directory; it is never a path. Letters, digits, '.', '_', '-', not
    starting with '.', at most 100 characters. Returns the tag; else a one-line PicochatError."""
    if not isinstance(tag, str) or not MODEL_TAG.fullmatch(tag):
        shown = repr(tag) if len(repr(tag)) <= 60 else repr(tag)[:57] + "..."
        raise PicochatError(f"{what} {shown} is not a valid name: use up to 100 letters, digits, '.', '_' "
                            f"or '-', not starting with '.' (a tag names a directory, not a path)")
    return tag


def checkpoint_dir(stage: str, model_tag: str) -> Path:
    """$PICOCHAT_HOME/checkpoints/<stage>/<tag>; stage is a key of COMMAND_OF_STAGE, tag a valid name."""
    if stage not in COMMAND_OF_STAGE:
        raise ValueError(f"unknown checkpoint stage {stage!r}; expected one of {', '.join(COMMAND_OF_STAGE)}")
    return picochat_home() / "checkpoints" / stage / check_model_tag(model_tag)


# -----------------------------------------------------------------------------
# Atomic writes: temp file in the same directory, fsync, rename, fsync the directory.
# A reader (or a crash) never sees a half-written file under the final name.

def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path next to `final`; on success it is fsynced and renamed into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def read_jsonl(path: Path, convert=None, on_bad_line=None) -> list:
    """Every non-blank line of a JSON-lines file, parsed, then passed through `convert` if given.
    A line that is not UTF-8 JSON, or that `convert` rejects (ValueError, KeyError, TypeError),
    raises PicochatError naming the file and line; with `on_bad_line(lineno, error)` it is left out
    instead and the callback told (a torn last line of a killed writer, a bad line in an import)."""
    import json
    values = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                value = json.loads(raw.decode("utf-8"))
                values.append(convert(value) if convert else value)
            except (ValueError, KeyError, TypeError) as e:
                if on_bad_line is None:
                    raise PicochatError(f"{path} line {lineno}: {type(e).__name__}: {e}") from None
                on_bad_line(lineno, e)
    return values


def file_lock(path: Path):
    """An exclusive lock between processes (e.g. torchrun ranks downloading the same file), held
    inside `with file_lock(path):`; the `filelock` package, its directory created if missing."""
    from filelock import FileLock
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


# -----------------------------------------------------------------------------
# Distributed

@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size as torchrun sets them (defaults: one process)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))


def threads_per_process(cores: int, local_processes: int) -> int:
    """CPU threads each process on a node may use: the node's cores shared evenly."""
    return max(1, cores // max(1, local_processes))


def node_share_of_cores() -> int:
    """This process's share of the cores it may run on (taskset/cgroups respected), divided among
    the processes torchrun started on this node (LOCAL_WORLD_SIZE): torch's threads and tiktoken's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return threads_per_process(cores, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun: NCCL on CUDA, gloo elsewhere. The node's
    cores are shared among its processes (torchrun sets LOCAL_WORLD_SIZE), so 8 ranks never run
    8 × all-cores threads (on CPU that thrashes; on GPU nodes it slows data packing)."""
    info = dist_info()
    if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
        torch.set_num_threads(node_share_of_cores())
    if info.distributed and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank))
        else:
            dist.init_process_group("gloo")
    return info


def shutdown_distributed() -> None:
    """Leave the process group together: without the barrier, rank 0 (which hosts the rendezvous store)
    can exit while another rank is still tearing down gloo, and that rank aborts with "terminate called
    without an active exception"."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if dist_info().is_master:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# Terminals: one rule for every progress line and colour picochat prints

ANSI = {"bold": "\033[1m", "dim": "\033[2m", "cyan": "\033[36m", "green": "\033[1;32m", "grey": "\033[2;37m"}
ANSI_RESET = "\033[0m"


def is_terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def color_enabled(stream) -> bool:
    """Colour only what goes to a terminal (a pipe or a file gets plain text), and never when
    NO_COLOR is set to anything but "" (https://no-color.org)."""
    return is_terminal(stream) and not os.environ.get("NO_COLOR")


def styled(text: str, style: str, color: bool) -> str:
    """`text` in an ANSI style (a key of ANSI) when `color`, else as it is."""
    return f"{ANSI[style]}{text}{ANSI_RESET}" if color else text


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar (rate and ETA) on rank 0 only; silent on other ranks. On a terminal it
    redraws one line; in a log (stderr redirected) it prints a plain line now and then instead."""
    from tqdm import tqdm
    kwargs.setdefault("disable", not dist_info().is_master)
    kwargs.setdefault("dynamic_ncols", True)
    file = kwargs.setdefault("file", sys.stderr)
    if is_terminal(file):
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("ascii", True)  # '#' rather than block characters in a log file
    return _log_bar_class()(iterable, **kwargs)


LOG_BAR_FRACTION, LOG_BAR_SECONDS = 0.1, 30.0  # a log line every 10% of the total, or every 30 s


@functools.cache
def _log_bar_class():
    from tqdm import tqdm

    class LogBar(tqdm):
        """tqdm for logs: each line it shows is a line of its own (no '\r' redraws piling up
        hundreds of frames in one line): at the start, every LOG_BAR_FRACTION of the total or
        LOG_BAR_SECONDS, whichever comes first, and at the end."""

        def display(self, msg=None, pos=None):
            if msg == "":  # tqdm clearing a bar with leave=False: nothing was drawn to clear
                return True
            now, closing = time.monotonic(), self.disable  # close() sets disable, then displays
            fraction = self.n / self.total if self.total else 0.0
            last = getattr(self, "_last_line", None)
            if closing or last is None or fraction - last[0] >= LOG_BAR_FRACTION or now - last[1] >= LOG_BAR_SECONDS:
                self.fp.write(self.__str__() + ("" if closing else "\n"))  # close() adds its own newline
                self.fp.flush()
                self._last_line = (fraction, now)
            return True

    return LogBar


# -----------------------------------------------------------------------------
# Device, dtype, seeding

def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def visible_nvidia_gpus() -> list[str]:
    """The GPUs `nvidia-smi -L` lists (empty when there is no nvidia-smi or it fails)."""
    import shutil
    import subprocess
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.stdout.splitlines() if line.startswith("GPU ")] if out.returncode == 0 else []


def cuda_unusable_reason() -> str | None:
    """None when torch can use a CUDA GPU; otherwise why not, in one line a user can act on."""
    if torch.cuda.is_available():
        return None
    gpus = visible_nvidia_gpus()
    build = f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'})"
    if gpus:
        return (f"nvidia-smi lists {len(gpus)} GPU(s) but {build} cannot use them; install a torch "
                f"build that matches the driver (`make clean-venv venv` picks one; docs/GPU.md)")
    return f"no CUDA GPU is visible to {build}"


def resolve_device(requested: str, info: DistInfo) -> torch.device:
    device_type = autodetect_device_type() if requested in ("", "auto") else requested
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None) == ""  # GPUs hidden on purpose
    if requested in ("", "auto") and device_type == "cpu" and not hidden and visible_nvidia_gpus():
        # never fall back to a CPU silently on a GPU machine: weeks of training, no error
        raise PicochatError(f"{cuda_unusable_reason()}; or pass --device cpu to run on the CPU anyway")
    if device_type not in ("cpu", "cuda", "mps"):
        raise PicochatError(f"--device must be auto, cpu, cuda or mps, got {requested!r}")
    if device_type == "cuda":
        reason = cuda_unusable_reason()
        if reason:
            raise PicochatError(f"--device cuda: {reason}")
        return torch.device("cuda", info.local_rank)
    return torch.device(device_type)


def setup_device(requested: str):
    """Pick the device and join the process group when under torchrun: returns (DistInfo, device)."""
    device = resolve_device(requested, dist_info())
    return init_distributed(device.type), device


def cpu_bf16_speedup(n: int = 512, reps: int = 3) -> float:
    """Measured ratio of fp32 to bf16 matmul time on this CPU (about 2.3 on the dev machine)."""
    def bench(dtype):
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            best = min(best, time.perf_counter() - t0)
        return best
    return bench(torch.float32) / bench(torch.bfloat16)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Compute dtype. 'auto': bf16 on CUDA SM>=80 and on CPUs whose bf16 matmul is clearly faster
    than fp32 (docs/LOG.md: bf16 trains as well as fp32 on the demo corpus); fp32 otherwise."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if requested != "auto":
        if requested not in names:
            raise PicochatError(f"--dtype must be auto, bfloat16 or float32, got {requested!r}")
        return names[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
    if device.type == "cpu":
        fast = torch.tensor([int(cpu_bf16_speedup() > 1.5)])
        if dist.is_initialized():  # ranks timed on a busy machine may disagree: rank 0 decides for all
            dist.broadcast(fast, src=0)
        return torch.bfloat16 if fast.item() else torch.float32
    return torch.float32


def seed_everything(seed: int) -> None:
    """Seed every generator a run may draw from: Python's random, NumPy and torch (all devices)."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tune_cpu_allocator() -> None:
    """Make glibc malloc keep freed blocks up to 32 MiB instead of handing each one back to the
    OS: by default every large activation is a fresh mmap that page-faults on first touch (about
    10% of a CPU training step in system time; docs/LOG.md). Linux/glibc only; a no-op elsewhere."""
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's maximum on 64-bit
    mallopt(M_TRIM_THRESHOLD, 2**30)  # free memory stays mapped until 1 GiB is idle at the top


# -----------------------------------------------------------------------------
# Peak FLOPs for MFU

# Dense bf16 peak FLOP/s by GPU name fragment, from the vendors' data sheets (no sparsity).
GPU_PEAK_FLOPS = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12),
    ("MI300X", 1307e12), ("MI250X", 383e12),
]


def measured_cpu_flops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a square matmul in `dtype` on this CPU, all threads: the 'peak' for CPU MFU.
    The first calls are slow (kernel selection, page faults, clocks ramping up), so it warms up
    for a quarter of a second before taking the best of `reps` timings."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t_end = time.perf_counter() + 0.25
    while time.perf_counter() < t_end:
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        a @ b
        best = min(best, (time.perf_counter() - t0) / 2)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s per device: a table for GPUs (inf when unknown, so MFU reads 0), measured on CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops in GPU_PEAK_FLOPS:
            if fragment in name:
                return flops if dtype in (torch.bfloat16, torch.float16) else flops / 2
        return float("inf")
    if device.type == "cpu":
        return measured_cpu_flops(dtype)
    return float("inf")
