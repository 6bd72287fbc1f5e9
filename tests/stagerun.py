"""Run real `picochat` processes from tests, and read what they wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def env_for(home: Path) -> dict:
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def picochat(home, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "picochat", *args], env=env_for(home),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"picochat {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(home: Path, tag: str, stage: str = "base") -> dict[int, float]:
    lines = (home / "checkpoints" / stage / tag / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def kill_after(home, *args, marker: str, command=("-m", "picochat")) -> None:
    """Start `picochat *args` (or python `command` *args), SIGKILL it as soon as it prints `marker`,
    and check it died."""
    proc = subprocess.Popen([sys.executable, *command, *args], env=env_for(home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before printing {marker!r} or being killed"
