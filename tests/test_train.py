"""
base_train end to end on a tiny model: loss falls, a SIGKILLed run resumes to the same losses,
2 processes under torchrun match 1 process, and bad input gets a one-line error.

These launch real `picochat` processes, so they are marked slow (they still run in `make test`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stagerun import env_for, kill_after, losses, picochat

TRAIN = ["--dataset", "tiny", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4",
         "--total-batch-size", "512", "--dtype", "float32", "--device", "cpu", "--eval-every", "10",
         "--eval-tokens", "1024", "--sample-every", "-1", "--embedding-lr", "0.05", "--matrix-lr", "0.02"]


@pytest.mark.slow
def test_loss_falls_and_metrics_are_written(tiny_home):
    picochat(tiny_home, "base_train", *TRAIN, "--num-iterations", "30", "--model-tag", "falls")
    path = tiny_home / "checkpoints" / "base" / "falls" / "metrics.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    for key in ("loss", "lr_mult", "tok_per_sec", "mfu"):
        assert all(key in r for r in train)
    assert sum(r["loss"] for r in train[-5:]) / 5 < train[0]["loss"] - 1.0
    vals = [r["val_bpb"] for r in records if "val_bpb" in r]
    assert len(vals) == 4 and vals[-1] < vals[0]  # steps 0, 10, 20, 30
    assert (tiny_home / "checkpoints" / "base" / "falls" / "step_000030" / "model.pt").exists()


# the 2026 recipe with every part on (windows short enough to matter at 64 tokens) and the seed's
RECIPES = pytest.mark.parametrize("recipe", [["--recipe", "seed"], ["--recipe", "2026", "--short-window", "8"]],
                                  ids=["seed", "2026"])


@pytest.mark.slow
@RECIPES
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_home, recipe):
    tag = recipe[1]
    run = [*TRAIN, *recipe, "--num-iterations", "30", "--save-every", "5"]
    picochat(tiny_home, "base_train", *run, "--model-tag", f"straight-{tag}")
    expected = losses(tiny_home, f"straight-{tag}")

    kill_after(tiny_home, "base_train", *run, "--model-tag", f"killed-{tag}", marker="saved checkpoint step 5")
    partial = losses(tiny_home, f"killed-{tag}")
    assert max(partial) < 30

    out = picochat(tiny_home, "base_train", *run, "--model-tag", f"killed-{tag}", "--resume").stdout
    assert "resumed from step" in out
    assert losses(tiny_home, f"killed-{tag}") == expected  # every step, bit for bit


@pytest.mark.slow
@RECIPES
def test_two_processes_match_one_process_with_the_same_total_batch(tiny_home, recipe):
    tag = recipe[1]
    run = [*TRAIN, *recipe, "--num-iterations", "8", "--eval-every", "-1"]
    picochat(tiny_home, "base_train", *run, "--model-tag", f"one-{tag}")
    # as the speedrun used to: every rank told to use all the cores
    env = dict(env_for(tiny_home), OMP_NUM_THREADS=str(2 * len(os.sched_getaffinity(0))))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "picochat", "base_train", *run, "--model-tag", f"two-{tag}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 rows × 64 × 2 proc × 1 accum" in proc.stdout
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores shared by the 2 ranks
    assert f"× 2 process(es), {threads} CPU thread(s) each" in proc.stdout
    one, two = losses(tiny_home, f"one-{tag}"), losses(tiny_home, f"two-{tag}")
    assert one.keys() == two.keys() == set(range(1, 9))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--total-batch-size", "1000"], "not a multiple of --max-seq-len"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dataset", "nothing-here"], "no train shards for dataset 'nothing-here'"),
    (["--fp8", "yes"], "--fp8 yes: FP8 needs an H100/Ada GPU"),
    (["--recipe", "2025"], "invalid choice: '2025'"),
])
def test_bad_input_gets_a_one_line_error(tiny_home, args, message):
    proc = picochat(tiny_home, "base_train", *TRAIN, "--num-iterations", "2", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_tokenizer_says_to_train_one(tmp_path):
    proc = picochat(tmp_path, "base_train", "--dataset", "tiny", check=False)
    assert proc.returncode == 2
    assert "run `picochat tok_train` first" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_auto_device_batch_size_picks_the_largest_power_of_two_that_divides(tiny_home):
    args = [a for a in TRAIN if a not in ("--device-batch-size", "4")]
    out = picochat(tiny_home, "base_train", *args, "--device-batch-size", "auto", "--total-batch-size", "1536",
                   "--num-iterations", "1", "--eval-every", "-1", "--model-tag", "auto").stdout
    # 1536 tokens = 24 rows of 64: 8 is the largest power of two that divides 24
    assert "8 rows × 64 × 1 proc × 3 accum" in out
    assert "memory estimate" in out


@pytest.mark.slow
def test_a_device_batch_that_does_not_divide_is_lowered_and_said(tiny_home):
    # 384 tokens = 6 rows of 64 per step; 4 rows per micro-batch do not divide 6, so 3 are used
    out = picochat(tiny_home, "base_train", *TRAIN, "--total-batch-size", "384", "--num-iterations", "1",
                   "--eval-every", "-1", "--model-tag", "lowered").stdout
    assert "device batch 4 → 3 rows: each process needs 6 rows per step" in out
    assert "3 rows × 64 × 1 proc × 2 accum" in out


@pytest.mark.parametrize("stage, defaults", [
    ("base_train", dict(total=524288, seq=2048, device_batch=32)),
    ("mid_train", dict(total=524288, seq=2048, device_batch=32)),
    ("sft", dict(total=65536, seq=2048, device_batch=8)),
])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 64, 100])
def test_every_stage_default_layout_works_at_any_number_of_processes(stage, defaults, world):
    # SFT's defaults at 8 processes need 4 rows per process, not 8: this used to stop the d20
    # speedrun with "not divisible" after hours of pretraining and midtraining.
    from picochat.training import batch_layout
    layout = batch_layout(defaults["total"], defaults["seq"], world, defaults["device_batch"], None, "cpu",
                          None, total_is_default=True)
    rows = layout.total_batch // defaults["seq"]
    assert layout.device_batch * layout.grad_accum * world == rows
    assert layout.device_batch <= defaults["device_batch"] and layout.total_batch >= defaults["total"]
    # and efficient: micro-batches of at least half the default (or of every row a process has),
    # and a step at most 1/8 larger than the fewest rows that split over the processes
    per_process = rows // world
    assert layout.device_batch >= min(per_process, defaults["device_batch"]) // 2
    fewest = -(-defaults["total"] // defaults["seq"] // world) * world * defaults["seq"]
    assert layout.total_batch <= fewest * 9 // 8
    assert bool(layout.notes) == (layout.total_batch != defaults["total"]
                                  or layout.device_batch != defaults["device_batch"])


def test_stage_defaults_are_the_ones_the_layout_test_covers():
    from picochat.stages import base_train, mid_train, sft
    from picochat.recipe import TRAINING
    p = base_train.build_parser()
    assert (TRAINING["seed"]["total-batch-size"], p.get_default("max_seq_len"), p.get_default("device_batch_size")) \
        == (524288, 2048, 32)
    assert TRAINING["2026"]["total-batch-size"] == -1  # from the horizon: a power of two >= 2^17 at d4 and up
    assert (mid_train.DEFAULTS["total_batch_size"], mid_train.DEFAULTS["device_batch_size"]) == (524288, 32)
    assert (sft.DEFAULTS["total_batch_size"], sft.DEFAULTS["device_batch_size"]) == (65536, 8)


def test_an_explicit_total_batch_that_does_not_split_over_the_processes_is_refused():
    from picochat.common import PicochatError
    from picochat.training import batch_layout
    with pytest.raises(PicochatError, match="do not split over 8 processes; use a multiple of 512"):
        batch_layout(64 * 12, 64, 8, 4, None, "cpu", None)
