#!/usr/bin/env python3
"""
Print the pip arguments that install the right torch for this machine (the Makefile runs this).

    python3 runs/torch_install.py      # e.g. "torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"

- No working `nvidia-smi` (none on PATH, or it fails, as it does with a broken driver): the CPU
  build, `torch==2.13.0`.
- A working `nvidia-smi`: the CUDA version the driver supports (the "CUDA Version: X.Y" of its
  header, else `--query-gpu=driver_version` and the table below) and the GPUs' compute capability,
  then the newest CUDA build of TORCH_GPU that this driver can run and that has kernels for them.
- No such build (a driver too old, a GPU too old): one line on stderr naming the versions,
  nothing on stdout, exit 2 (the Makefile then stops).

Overrides (environment): TORCH_SPEC="..." is printed as it is; TORCH_VARIANT=cpu|cu126|cu128|cu130
forces the build. Standard library only; any python3 >= 3.10.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

TORCH_CPU = "torch==2.13.0"  # the CPU build (a wheel on local disk in CI); keep as it is
TORCH_GPU = "2.9.1"
INDEX = "https://download.pytorch.org/whl/{variant}"
# The CUDA builds of torch 2.9.1, oldest first: (CUDA version the driver must support, name,
# compute capabilities with kernels: lowest, and first major version without).
# Verified by searching public references (not by downloading; this machine reaches PyPI only):
# - PyTorch's RELEASE.md compatibility matrix: 2.9 ships CUDA 12.6 and 12.8 (stable) and 13.0
#   (experimental); a mirror listing of download.pytorch.org shows torch-2.9.1+cu130 (and +cu129)
#   wheels for CPython 3.10-3.14, linux x86_64 and aarch64; 2.9.1+cu126 is widely reported installed.
# - PyTorch's CUDA support matrix for 2.9 (pytorch/pytorch PR 164471): 12.6 has Maxwell 5.0 to
#   Hopper 9.0; 12.8 has Volta 7.0 to Blackwell 10.0 and 12.0; 13.0 has Turing 7.5 to Blackwell.
# cu129 is left out: it adds nothing over cu128 here. Later torch (2.12, 2.13) has no cu128 build.
VARIANTS = [((12, 6), "cu126", (5, 0), 10), ((12, 8), "cu128", (7, 0), 13), ((13, 0), "cu130", (7, 5), 13)]
STABLE = {"cu126", "cu128"}  # PyTorch calls its 2.9 CUDA 13.0 build experimental
# Minimum Linux driver for each CUDA version (NVIDIA's CUDA Toolkit release notes, the GA
# releases): used only when the nvidia-smi header does not say the CUDA version.
DRIVER_CUDA = [((580, 65), (13, 0)), ((575, 51), (12, 9)), ((570, 26), (12, 8)), ((560, 28), (12, 6)),
               ((555, 42), (12, 5)), ((550, 54), (12, 4)), ((545, 23), (12, 3)), ((535, 54), (12, 2)),
               ((530, 30), (12, 1)), ((525, 60), (12, 0)), ((520, 61), (11, 8)), ((450, 80), (11, 0))]


class Refusal(Exception):
    """No torch build can be chosen; the message is printed as one line."""


def note(message: str) -> None:
    print(f"torch_install: {message}", file=sys.stderr)


def nvidia_smi(*args: str, quiet: bool = False) -> str | None:
    """stdout of `nvidia-smi ARGS`, or None when it is missing, fails or hangs (said on stderr unless quiet)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        if not quiet:
            note(f"nvidia-smi did not run ({e}); installing the CPU build")
        return None
    if proc.returncode != 0:
        if not quiet:
            first = (proc.stdout + proc.stderr).strip().splitlines()
            note(f"nvidia-smi failed (exit {proc.returncode}{': ' + first[0] if first else ''}); "
                 f"installing the CPU build")
        return None
    return proc.stdout


def version_pair(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_from_header(header: str) -> tuple[int, int] | None:
    m = re.search(r"CUDA[^:|\n]*Version\s*:\s*(\d+)\.(\d+)", header)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_from_driver(driver: str) -> tuple[int, int] | None:
    version = version_pair(driver)
    if version is None:
        return None
    for min_driver, cuda in DRIVER_CUDA:
        if version >= min_driver:
            return cuda
    return (0, 0)  # older than the table: too old for any build


def query(field: str) -> list[str]:
    out = nvidia_smi(f"--query-gpu={field}", "--format=csv,noheader", quiet=True) or ""
    return [line.strip() for line in out.splitlines() if line.strip()]


def driver_cuda_version() -> tuple[tuple[int, int], str] | None:
    """(CUDA version the driver supports, where that came from), or None without a working driver."""
    header = nvidia_smi()
    if header is None:
        return None
    cuda = cuda_from_header(header)
    if cuda:
        return cuda, "the nvidia-smi header"
    drivers = query("driver_version")
    cuda = cuda_from_driver(drivers[0]) if drivers else None
    if cuda is None:
        raise Refusal("nvidia-smi works but says neither its CUDA version nor its driver version; "
                      "set TORCH_SPEC to the torch build to install")
    return cuda, f"driver {drivers[0]}"


def fmt(version: tuple[int, int]) -> str:
    return "below 11.0" if version == (0, 0) else f"{version[0]}.{version[1]}"


def spec_for(variant: str) -> str:
    return TORCH_CPU if variant == "cpu" else f"torch=={TORCH_GPU} --index-url {INDEX.format(variant=variant)}"


def choose() -> str:
    if os.environ.get("TORCH_SPEC", "").strip():
        return os.environ["TORCH_SPEC"].strip()
    forced = os.environ.get("TORCH_VARIANT", "").strip()
    if forced:
        known = ["cpu"] + [v[1] for v in VARIANTS]
        if forced not in known:
            raise Refusal(f"TORCH_VARIANT={forced} is not one of {', '.join(known)}")
        return spec_for(forced)
    found = driver_cuda_version()
    if found is None:
        return TORCH_CPU
    cuda, source = found
    # A build runs on a driver of the same CUDA major version even when its minor version is newer
    # (CUDA's minor-version compatibility: cu126 on a 12.2 driver, as many H100 clouds have).
    usable = [v for v in VARIANTS if v[0] <= cuda or v[0][0] == cuda[0]]
    if not usable:
        raise Refusal(f"the NVIDIA driver supports CUDA {fmt(cuda)} (from {source}) but torch=={TORCH_GPU} "
                      f"needs CUDA {VARIANTS[0][0][0]}.x: upgrade the driver, or set TORCH_SPEC "
                      f"(TORCH_VARIANT=cpu for the CPU build)")
    # only builds with kernels for every GPU (unknown when this nvidia-smi cannot say)
    caps = [c for c in map(version_pair, query("compute_cap")) if c]
    fitting = [v for v in usable if all(v[2] <= c and c[0] < v[3] for c in caps)]
    if not fitting:
        names = ", ".join(sorted({f"{c[0]}.{c[1]}" for c in caps}))
        raise Refusal(f"no CUDA build of torch=={TORCH_GPU} that this driver (CUDA {fmt(cuda)}) can run has "
                      f"kernels for GPU compute capability {names}; set TORCH_SPEC (TORCH_VARIANT=cpu "
                      f"for the CPU build)")
    # The newest stable build the driver supports outright; the experimental one (cu130) only
    # when no stable build has the GPUs' kernels; past the driver's minor version, the closest.
    within = [v for v in fitting if v[0] <= cuda]
    pool = [v for v in (within or fitting) if v[1] in STABLE] or within or fitting
    chosen = pool[-1] if within else pool[0]
    if chosen[0] > cuda:
        note(f"the driver supports CUDA {fmt(cuda)}; {chosen[1]} runs on it through CUDA's minor-version "
             f"compatibility, but torch.compile may need a newer driver (if compiling fails, upgrade "
             f"the driver or pass --compile no)")
    return spec_for(chosen[1])


def main() -> int:
    try:
        print(choose())
    except Refusal as e:
        print(f"torch_install: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
