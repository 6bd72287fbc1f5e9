"""
The d20 recipe rehearsed on the CPU: `runs/speedrun.sh d20 --rehearsal` runs every stage of the
8-GPU preset (data, tokenizer, base, base_eval, mid, chat_eval, SFT, chat_eval, report) as 8 gloo
processes, with the preset's flag defaults and batch layout, on a tiny model and the offline data.
A recipe that would stop hours into a GPU run (SFT's default device batch did not divide at 8
processes) stops here in minutes instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stagerun import env_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_d20_preset_rehearsal_runs_end_to_end_on_8_processes(tmp_path):
    home = tmp_path / "home"
    env = dict(env_for(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("OMP_NUM_THREADS")  # as a user runs it; each rank gets cores ÷ 8 threads
    proc = subprocess.run(["bash", str(REPO / "runs" / "speedrun.sh"), "d20", "--rehearsal"], env=env,
                          capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "rehearsal.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    assert "=== done: preset d20" in proc.stdout
    # everything under a home of its own: nothing where the real d20 run would resume
    assert not (home / "checkpoints").exists() and not (home / "tokenizer").exists()
    home = home / "rehearsal"

    # the real preset's layout: 8 processes everywhere, SFT's 8-row default lowered to 4 and said so
    assert proc.stdout.count("× 8 proc × 1 accum") == 3  # base, mid, SFT
    assert "device batch 8 → 4 rows: each process needs 4 rows per step" in proc.stdout
    for stage in ("base", "mid", "sft"):
        assert list((home / "checkpoints" / stage / "d20").glob("step_*/rank_7.pt")), stage
    for stage in ("mid", "sft"):  # every chat task was scored by all 8 ranks together
        results = json.loads((home / "evals" / f"chat_{stage}_d20_step000004.json").read_text())
        assert {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"} <= set(results["results"])
    assert (home / "report" / "report.md").exists()
