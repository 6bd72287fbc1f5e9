"""
base_train end to end on a tiny model: loss falls, a SIGKILLed run resumes to the same losses,
2 processes under torchrun match 1 process, and bad input gets a one-line error.

These launch real `picochat` processes, so they are marked slow (they still run in `make test`).
"""
from __future__ import annotations

import json
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


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_home):
    run = [*TRAIN, "--num-iterations", "60", "--save-every", "5"]
    picochat(tiny_home, "base_train", *run, "--model-tag", "straight")
    expected = losses(tiny_home, "straight")

    kill_after(tiny_home, "base_train", *run, "--model-tag", "killed", marker="saved checkpoint step 10")
    partial = losses(tiny_home, "killed")
    assert max(partial) < 60

    out = picochat(tiny_home, "base_train", *run, "--model-tag", "killed", "--resume").stdout
    assert "resumed from step" in out
    assert losses(tiny_home, "killed") == expected  # every step, bit for bit


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_total_batch(tiny_home):
    run = [*TRAIN, "--num-iterations", "8", "--eval-every", "-1"]
    picochat(tiny_home, "base_train", *run, "--model-tag", "one")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "picochat", "base_train", *run, "--model-tag", "two"],
                          env=env_for(tiny_home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 rows × 64 × 2 proc × 1 accum" in proc.stdout
    one, two = losses(tiny_home, "one"), losses(tiny_home, "two")
    assert one.keys() == two.keys() == set(range(1, 9))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--total-batch-size", "1000"], "not a multiple of --max-seq-len"),
    (["--total-batch-size", "640"], "not divisible by device batch 4"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dataset", "nothing-here"], "no train shards for dataset 'nothing-here'"),
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
