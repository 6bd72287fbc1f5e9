"""
mid_train / sft end to end on a tiny base model and a conversation file: loss on assistant tokens
only, a finite loss when a micro-batch has nothing to learn, and exact resume after SIGKILL.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stagerun import env_for, kill_after, losses, picochat

BASE = ["--dataset", "tiny", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "512", "--dtype", "float32", "--device", "cpu", "--eval-every", "-1",
        "--sample-every", "-1", "--num-iterations", "4", "--eval-tokens", "1024"]
SFT = ["--source", "base", "--source-tag", "ftbase", "--device-batch-size", "4", "--total-batch-size", "512",
       "--dtype", "float32", "--device", "cpu", "--eval-every", "5", "--eval-tokens", "512",
       "--init-lr-frac", "0.5"]


def write_conversations(path, n, long_user=False):
    with open(path, "w") as f:
        for i in range(n):
            user = ("tell me about the king " * 30) if long_user else f"what is {i} plus {i}?"
            messages = [{"role": "user", "content": user},
                        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
        f.write("not json\n")  # a malformed line is skipped, not fatal
    return path


@pytest.fixture(scope="module")
def base_home(tiny_home):
    picochat(tiny_home, "base_train", *BASE, "--model-tag", "ftbase")
    return tiny_home


@pytest.mark.slow
def test_sft_resume_after_sigkill_matches_uninterrupted_run(base_home, tmp_path):
    data = write_conversations(tmp_path / "chats.jsonl", 300)
    run = [*SFT, "--mixture", str(data), "--num-iterations", "30", "--save-every", "5"]
    picochat(base_home, "sft", *run, "--model-tag", "sft-straight")
    expected = losses(base_home, "sft-straight", stage="sft")
    assert len(expected) == 30 and expected[30] < expected[1]

    kill_after(base_home, "sft", *run, "--model-tag", "sft-killed", marker="saved checkpoint step 10")
    picochat(base_home, "sft", *run, "--model-tag", "sft-killed", "--resume")
    assert losses(base_home, "sft-killed", stage="sft") == expected


@pytest.mark.slow
def test_loss_is_finite_when_no_token_is_supervised(base_home, tmp_path):
    # Every user turn is longer than the 64-token row, so the assistant's part is cut off.
    data = write_conversations(tmp_path / "long.jsonl", 40, long_user=True)
    picochat(base_home, "sft", *SFT, "--mixture", str(data), "--num-iterations", "3", "--model-tag", "sft-empty")
    records = [json.loads(l) for l in (base_home / "checkpoints" / "sft" / "sft-empty" / "metrics.jsonl").read_text().splitlines()]
    assert [r["supervised_tokens"] for r in records] == [0, 0, 0]
    assert all(r["loss"] == 0.0 for r in records)


@pytest.mark.slow
def test_mid_train_runs_one_epoch_by_default_with_loss_on_every_token(base_home, tmp_path):
    data = write_conversations(tmp_path / "few.jsonl", 60)
    out = picochat(base_home, "mid_train", *SFT, "--mixture", str(data), "--model-tag", "mid-epoch").stdout
    assert "loss on          every token" in out
    records = [json.loads(l) for l in (base_home / "checkpoints" / "mid" / "mid-epoch" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["progress"] == 1.0 and all(r["progress"] < 1.0 for r in records[:-1])


@pytest.mark.slow
def test_two_processes_match_one_process_in_sft(base_home, tmp_path):
    data = write_conversations(tmp_path / "chats.jsonl", 300)
    run = [*SFT, "--mixture", str(data), "--num-iterations", "6"]
    picochat(base_home, "sft", *run, "--model-tag", "sft-one")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "picochat", "sft", *run, "--model-tag", "sft-two"],
                          env=env_for(base_home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 rows × 64 × 2 proc × 1 accum" in proc.stdout
    one, two = losses(base_home, "sft-one", stage="sft"), losses(base_home, "sft-two", stage="sft")
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])
