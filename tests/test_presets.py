"""The GPU presets' horizon and batch against numbers worked out by hand from the rules
(B = 2^round(log2(2^19·(D/D_d12)^0.383)), D = ratio × (block matrices + head)), and the
speedrun's preset and recipe arguments."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from picochat.presets import plan

REPO = Path(__file__).resolve().parent.parent


def test_d20_under_the_2026_recipe():
    e = plan("d20", "2026")
    # blocks 12·20·1280² + value-embedding gates 10 layers × 12 × 10 heads; head 32,768 × 1,280
    assert e["scaling_params"] == 12 * 20 * 1280 ** 2 + 10 * 12 * 10 + 32768 * 1280 == 435_160_240
    assert e["params"] == 896_533_746  # nanochat HEAD's d20 count
    # D = 12 × 435,160,240 = 5.22B; D_d12 = 12 × 110,100,912: (D/D_d12)^0.383 = 1.69 → 2^19.76 → 2^20
    assert e["total_batch"] == 2 ** 20 and e["steps"] == 5_221_922_880 // 2 ** 20 == 4980


def test_gpt2_is_nanochats_d24_speedrun():
    e = plan("gpt2", "2026")
    assert (e["depth"], e["ratio"], e["total_batch"], e["steps"]) == (24, 8.0, 2 ** 20, 5568)
    assert e["params"] == 1_384_122_122


def test_d12_is_the_reference_and_the_seed_d20_is_the_seeds_table():
    e = plan("d12", "2026")
    assert e["total_batch"] == 2 ** 19 and e["steps"] == 12 * 110_100_912 // 2 ** 19 == 2520
    seed = plan("d20", "seed")
    # the seed: 20 tokens per parameter (all 560,988,160 of them), a fixed 524,288-token batch
    assert seed["params"] == 560_988_160 and seed["total_batch"] == 524288 and seed["steps"] == 21400
    assert seed["flops"] == pytest.approx(3.92e19, rel=0.01) and seed["dataset"] == "fineweb-edu"


def test_the_plan_prints_hours_and_dollars():
    out = subprocess.run([sys.executable, "-m", "picochat.presets", "gpt2"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert "h of pretraining" in out and "~$" in out and "5,568 steps" in out


@pytest.mark.parametrize("args, message", [
    (["d20", "--recipe", "2025"], "unknown recipe '2025'"),
    (["d12", "--rehearsal"], "rehearses the d20 preset only"),
    (["d99"], "unknown preset 'd99'"),
])
def test_speedrun_refuses_bad_arguments_in_one_line(args, message, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "runs" / "speedrun.sh"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2 and message in proc.stderr


def test_the_2026_warmup_is_40_steps_at_most_2_percent_of_the_run():
    from picochat.recipe import warmup_steps
    assert [warmup_steps(-1, n) for n in (2520, 4980, 1000, 113, 10)] == [40, 40, 20, 2, 0]
    assert warmup_steps(0, 5000) == 0 and warmup_steps(7, 100) == 7  # an explicit count is kept
