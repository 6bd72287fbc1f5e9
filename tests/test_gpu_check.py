"""
benchmarks/gpu_check.py on this CPU: `--cpu-dry-run` runs every check's code path on a tiny model
(base_train processes included) and must pass them all (recipe_fp8 is skipped: no FP8 GPU), with
rustbpe, fastapi and uvicorn made unimportable as on a bare GPU box; a failing check must fail the
run while the others still run; a run killed midway leaves every finished check in --out; a check
that does not fit the time budget is skipped, saying so; after a CUDA error only the base_train
runs go on, and nothing raises; --help documents the flags.

    pytest -q tests/test_gpu_check.py
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
DRY_RUN_CHECKS = {"fused_ops": "PASS", "head_loss": "PASS", "fp8": "PASS", "sharded_optim": "PASS",
                  "eval_memory": "PASS", "recipe_seed": "PASS", "recipe_2026": "PASS", "recipe_fp8": "SKIP",
                  "train_d2": "PASS", "kv_cache": "PASS", "compile_vs_eager": "PASS", "resume": "PASS"}


BARE_MACHINE_MISSING = ("rustbpe", "fastapi", "uvicorn")  # not installed where gpu_check must run


def block_imports(directory: Path) -> Path:
    """A directory of stand-in packages that fail to import, to put first on PYTHONPATH."""
    for name in BARE_MACHINE_MISSING:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on a bare GPU machine (tests/test_gpu_check.py)')\n")
    return directory


def environment(tmp_path: Path, bare: bool = False) -> dict:
    path = [str(block_imports(tmp_path / "blocked"))] if bare else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [str(REPO)]), OMP_NUM_THREADS="1",
               TMPDIR=str(tmp_path))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PICOCHAT_HOME"):
        env.pop(key, None)  # the script makes its own PICOCHAT_HOME (under TMPDIR)
    return env


def gpu_check(tmp_path: Path, *args: str, bare: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=environment(tmp_path, bare),
                          capture_output=True, text=True, timeout=600)


def table_rows(stdout: str) -> dict[str, str]:
    """check name -> PASS/FAIL/SKIP, from the table printed at the end."""
    table = stdout[stdout.rindex("\ncheck "):].strip().splitlines()
    rows = [line.split("|") for line in table[2:] if "|" in line]
    return {cells[0].strip(): cells[-1].strip() for cells in rows}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_dry_run_passes_every_check(tmp_path):
    proc = gpu_check(tmp_path, "--cpu-dry-run", "--out", "report.jsonl", bare=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert table_rows(proc.stdout) == DRY_RUN_CHECKS
    run, *checks, summary = records(tmp_path / "report.jsonl")
    assert run["record"] == "run" and run["versions"]["torch"] == torch.__version__
    assert {c["check"]: c["status"].upper() for c in checks} == DRY_RUN_CHECKS
    assert [c["check"] for c in checks] == list(DRY_RUN_CHECKS)
    assert summary["record"] == "summary" and summary["passed"] and summary["skipped"] == ["recipe_fp8"]
    resume = next(c for c in checks if c["check"] == "resume")["numbers"]
    assert resume["bitwise_equal"] and resume["killed_after_step"] < resume["steps"]
    recipes = {c["check"]: c["numbers"] for c in checks if c["check"].startswith("recipe_") and c["numbers"]}
    assert recipes["recipe_2026"]["baseline"] == "recipe_seed" and recipes["recipe_2026"]["flags"][:2] == [
        "--recipe", "2026"]
    assert all(r["val_bpb"] > 0 and r["tokens"] == recipes["recipe_seed"]["tokens"] for r in recipes.values())
    assert not list(tmp_path.glob("picochat_gpu_check_*")), "the temporary PICOCHAT_HOME was left behind"


@pytest.mark.parametrize("stop", ["SIGKILL to its process group", "SIGTERM"])
def test_a_run_killed_midway_leaves_every_finished_check_in_out(tmp_path, stop):
    out, log = tmp_path / "report.jsonl", tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out),
                                 "--checks", "fused_ops,head_loss,train,kv_cache"], cwd=tmp_path,
                                env=environment(tmp_path), stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: base_train dies with it
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if out.exists() and sum(r["record"] == "check" for r in records(out)) >= 2:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before it could be killed"
        finally:
            if stop == "SIGTERM":  # a scheduler's time limit: the script stops its base_train and cleans up
                proc.send_signal(signal.SIGTERM)
            else:  # the machine taken away: nothing runs after this
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait(timeout=60)
    if stop == "SIGTERM":
        assert code == 128 + signal.SIGTERM
        assert not list(tmp_path.glob("picochat_gpu_check_*")), "the temporary PICOCHAT_HOME was left behind"
    run, *checks = records(out)  # every line is whole JSON
    assert run["record"] == "run" and run["versions"]["pinned_torch"]
    assert all(c["record"] == "check" for c in checks), "a summary although the run was killed"
    printed = log.read_text()
    finished = [name for name in ("fused_ops", "head_loss", "train_d2", "kv_cache")
                if f"] {name} (" in printed and "  -> " in printed.split(f"] {name} (")[1].split("\n[")[0]]
    assert len(finished) >= 2 and [c["check"] for c in checks] == finished


def test_a_check_that_does_not_fit_the_budget_is_skipped_and_said_so(tmp_path):
    proc = gpu_check(tmp_path, "--cpu-dry-run", "--checks", "fused_ops,train", "--budget", "0.2", "--out", "r.jsonl")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert table_rows(proc.stdout) == {"fused_ops": "PASS", "train_d2": "SKIP"}  # ~15 s needed, < 12 s left
    skipped = next(r for r in records(tmp_path / "r.jsonl") if r.get("check") == "train_d2")
    assert skipped["status"] == "skip" and "of the 0.2-min budget" in skipped["result"]
    proc = gpu_check(tmp_path, "--cpu-dry-run", "--quick", "--budget", "0")
    assert proc.returncode == 0 and table_rows(proc.stdout) == {
        name: "SKIP" for name in ("fused_ops", "head_loss", "fp8", "sharded_optim", "eval_memory", "train_d2")}


def test_after_a_cuda_error_only_base_train_runs_go_on_and_nothing_raises(monkeypatch, tmp_path):
    gc = load_gpu_check()
    args = gc.build_parser().parse_args(["--cpu-dry-run"])
    ctx = gc.Context(args, copy.deepcopy(gc.DRY_PLAN), tmp_path, time.time(), 480.0)
    ctx.device = torch.device("cuda", 0)  # as if: every CUDA call now raises, as after an illegal address

    def sticky_error(*_args, **_kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", sticky_error)
    monkeypatch.setattr(torch.cuda, "empty_cache", sticky_error)
    passing = lambda c: (True, "ok", "", {})  # noqa: E731
    assert gc.run_one(ctx, "fused_ops", lambda c: sticky_error(), None)["status"] == "fail"
    after = gc.run_one(ctx, "head_loss", passing, None)
    assert after["status"] == "skip" and "illegal memory access" in after["result"]
    assert gc.run_one(ctx, "resume", passing, None)["status"] == "pass"  # a separate process: unaffected


def test_versions_warn_when_torch_is_not_the_pinned_build(monkeypatch):
    gc = load_gpu_check()
    assert gc.versions(torch.device("cpu"))["pinned_torch"] == gc.pinned_torch()[0]
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    warning = gc.versions(torch.device("cpu"))["warning"]
    assert warning.startswith("torch 2.11.0+cu130 is not the pinned ") and "runs/torch_install.py" in warning


def test_a_failing_check_fails_the_run_and_the_others_still_run(tmp_path):
    proc = gpu_check(tmp_path, "--cpu-dry-run", "--checks", "fused_ops,head_loss", "--inject-failure", "fused_ops")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert table_rows(proc.stdout) == {"fused_ops": "FAIL", "head_loss": "PASS"}
    assert "injected failure" in proc.stdout


def test_help_explains_every_flag(tmp_path):
    proc = gpu_check(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--cpu-dry-run", "--out", "--budget", "--quick", "--checks", "--depths", "--steps",
                 "--recipe-steps", "--recipe-extra", "--device-batch-size", "--op-depth", "--head-chunks",
                 "--timeout", "--keep-home"):
        assert flag in proc.stdout
    assert "--inject-failure" not in proc.stdout  # a test hook, not a user flag
