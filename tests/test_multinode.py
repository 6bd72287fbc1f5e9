"""Multi-node training for real, on one machine: two torchrun agents (2 "nodes" × 2 processes) meet through
a c10d rendezvous on 127.0.0.1, exactly as two machines would through the head node's address, and train
the same per-step losses as one process with the same total batch."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_corpus
from picochat.data.shards import write_shard
from stagerun import env_for, losses, picochat

DATASET = "tiny-4streams"
# tests/test_train.py's TRAIN with 2 rows per micro-batch: 512 tokens = 8 rows of 64 = 2 rows × 4 processes
# × 1 accum, or 2 rows × 1 process × 4 accum; the same 4 data streams either way. The matrix LR is half
# TRAIN's: 4 gradients summed in another order differ in the last fp32 bit, Muon's bf16 Newton-Schulz
# amplifies that, and at 0.02 the losses drift apart by up to 1.2e-4 by step 8 (at 0.01: under 4e-5
# for seeds 1, 2, 3 and 42). With 2 processes the two sums agree bit for bit, so test_train can keep 0.02
# (and runs both recipes). Here the seed recipe: the 2026 one (Polar Express, NorMuon, in bf16 too)
# amplified the 4-way sum's last-bit differences to 1.6e-4 by step 7.
RUN = ["--dataset", DATASET, "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "2",
       "--total-batch-size", "512", "--dtype", "float32", "--device", "cpu", "--eval-every", "-1",
       "--eval-tokens", "1024", "--sample-every", "-1", "--embedding-lr", "0.05", "--matrix-lr", "0.01",
       "--num-iterations", "8", "--recipe", "seed"]
TIMEOUT = 240  # seconds for the whole two-node run; it takes 10-30 s on 2 cores


def four_stream_dataset(home) -> None:
    """The tiny dataset's train shards, and a val shard of 6 row groups: the final evaluation reads
    4 streams, and "tiny"'s val shard has 3 row groups."""
    src, dst = home / "data" / "tiny", home / "data" / DATASET
    if dst.exists():
        return
    dst.mkdir(parents=True)
    for shard in src.glob("shard_*.parquet"):
        shutil.copy(shard, dst / shard.name)
    write_shard(dst / "val_00000.parquet", make_corpus(60, seed=1), row_group_size=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(home, port: int, run_id: str, tag: str, log) -> subprocess.Popen:
    """One torchrun agent: one "node" of 2 processes, printing to the file `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
           "--rdzv-conf", "join_timeout=120", "--local-addr", "127.0.0.1", "--max-restarts", "0",
           "-m", "picochat", "base_train", *RUN, "--model-tag", tag]
    env = env_for(home)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo between "nodes" over loopback
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), children first."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def stop(proc: subprocess.Popen) -> None:
    """End an agent that is still running, and its workers (each in a session of its own, so a
    process-group kill would miss them): SIGTERM, which the agent passes on to its workers, then
    SIGKILL for whatever is left."""
    workers = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_two_agents(homes, tag: str, tmp_path):
    """Two agents (agent i with PICOCHAT_HOME homes[i]) until both end, one fails or time runs out;
    returns (exit codes, their output)."""
    port, run_id = free_port(), f"picochat-test-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / f"{tag}-agent{i}.log" for i in range(2)]
    agents = []
    try:
        for home, path in zip(homes, logs):
            with open(path, "w") as log:
                agents.append(agent(home, port, run_id, tag, log))
        deadline = time.monotonic() + TIMEOUT
        # until both finish, one fails (the other would wait for it), or time runs out
        while time.monotonic() < deadline and any(p.poll() is None for p in agents) \
                and not any(p.poll() for p in agents):
            time.sleep(0.2)
    finally:
        for proc in agents:
            if proc.poll() is None:
                stop(proc)
    out = "\n".join(f"--- agent {i} (exit {p.returncode}) ---\n{path.read_text()}"
                    for i, (p, path) in enumerate(zip(agents, logs)))
    return [p.returncode for p in agents], out


@pytest.mark.slow
def test_two_nodes_of_two_processes_match_one_process(tiny_home, tmp_path):
    four_stream_dataset(tiny_home)
    picochat(tiny_home, "base_train", *RUN, "--model-tag", "one-node")
    codes, out = run_two_agents([tiny_home, tiny_home], "two-nodes", tmp_path)
    assert codes == [0, 0], out
    assert "2 rows × 64 × 4 proc × 1 accum" in out, out  # 4 processes in one group: both nodes joined

    one, two = losses(tiny_home, "one-node"), losses(tiny_home, "two-nodes")
    assert one.keys() == two.keys() == set(range(1, 9))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])


@pytest.mark.slow
def test_nodes_that_do_not_share_picochat_home_are_refused_before_training(tiny_home, tmp_path):
    # the second "node" has its own copy of the data and tokenizer but not the first one's disk:
    # its ranks' checkpoint parts would land where rank 0 never renames them
    four_stream_dataset(tiny_home)
    other = tmp_path / "other-node-home"
    shutil.copytree(tiny_home / "data", other / "data")
    shutil.copytree(tiny_home / "tokenizer", other / "tokenizer")
    codes, out = run_two_agents([tiny_home, other], "unshared", tmp_path)
    assert codes[0] != 0 and codes[1] != 0, out
    assert "2 of 4 processes cannot see the checkpoint directory" in out, out
    assert "filesystem that every node shares" in out
    assert "| loss " not in out  # refused before the first step
