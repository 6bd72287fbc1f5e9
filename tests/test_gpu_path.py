"""
What the GPU path does on a machine where it cannot work, and the parts of it a CPU can check:
a visible GPU that torch cannot use is a one-line error (never weeks of silent CPU training),
and ranks agree on an automatic device batch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stagerun import env_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_gpu_path(tmp_path):
    """A PATH whose nvidia-smi lists one H100, as on a GPU node whose torch build cannot use it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n")
    smi.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_a_gpu_torch_cannot_use_is_a_one_line_error(tmp_path, fake_gpu_path, device):
    env = dict(env_for(tmp_path), PATH=fake_gpu_path)
    proc = subprocess.run([sys.executable, "-m", "picochat", "base_train", "--device", device],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nvidia-smi lists 1 GPU(s) but torch" in proc.stderr and "cannot use them" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_gpus_hidden_on_purpose_let_auto_run_on_the_cpu(tmp_path, fake_gpu_path):
    env = dict(env_for(tmp_path), PATH=fake_gpu_path, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "picochat", "base_train", "--device", "auto"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert "cannot use them" not in proc.stderr
    assert "run `picochat tok_train` first" in proc.stderr  # it got as far as looking for a tokenizer


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_the_d20_speedrun_stops_before_any_work_when_torch_cannot_use_the_gpu(tmp_path, fake_gpu_path):
    env = dict(env_for(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{fake_gpu_path}")
    proc = subprocess.run(["bash", str(REPO / "runs" / "speedrun.sh"), "d20"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot use them" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing downloaded, nothing trained


def test_the_cpu_threads_of_a_node_are_shared_by_its_processes(monkeypatch):
    from picochat import tokenizer
    from picochat.common import threads_per_process
    assert [threads_per_process(16, n) for n in (1, 2, 8, 32)] == [16, 8, 2, 1]
    # tiktoken's batch encoding too: 8 ranks on a 16-core node encode with 2 threads each
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    seen = []
    tok = tokenizer.Tokenizer.__new__(tokenizer.Tokenizer)
    tok.enc = type("Enc", (), {"encode_ordinary_batch": lambda self, texts, num_threads: seen.append(num_threads) or [[1]] * len(texts)})()
    tok.encode(["a", "b"])
    assert seen == [2]


def _agree_worker(rank, init_file, budgets, out_dir):
    import torch.distributed as dist
    from picochat import training
    from picochat.common import shutdown_distributed
    from picochat.model import GPT, config_from_depth
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    training.available_memory_gib = lambda device: budgets[rank]  # this rank sees less memory
    model = GPT(config_from_depth(2, vocab_size=512, sequence_len=64))
    model.init_weights()
    chosen = training.auto_device_batch_size(model, 64, 32, torch.device("cpu"), torch.float32, 2)
    (Path(out_dir) / f"rank{rank}").write_text(str(chosen))
    shutdown_distributed()


@pytest.mark.slow
def test_ranks_agree_on_an_automatic_device_batch(tmp_path):
    # rank 1 has room for fewer rows than rank 0; both must run the same (smaller) layout
    from picochat.model import GPT, config_from_depth
    from picochat.training import estimate_memory_gib
    model = GPT(config_from_depth(2, vocab_size=512, sequence_len=64))
    tight = estimate_memory_gib(model, 4, 64, torch.float32, 2) / 0.6 * 1.01  # fits 4 rows, not 8
    budgets = [1000.0, tight]
    torch.multiprocessing.spawn(_agree_worker, args=(str(tmp_path / "init"), budgets, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["4", "4"]
