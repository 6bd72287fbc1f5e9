"""
benchmarks/gpu_check.py on this CPU: `--cpu-dry-run` runs every check's code path on a tiny model
(base_train processes included) and must pass them all, with rustbpe, fastapi and uvicorn made
unimportable as on a bare GPU box; a failing check must fail the run while the others still run;
--help documents the flags.

    pytest -q tests/test_gpu_check.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
DRY_RUN_CHECKS = ["fused_ops", "head_loss", "kv_cache", "sharded_optim", "eval_memory", "train_d2",
                  "compile_vs_eager", "resume"]


BARE_MACHINE_MISSING = ("rustbpe", "fastapi", "uvicorn")  # not installed where gpu_check must run


def block_imports(directory: Path) -> Path:
    """A directory of stand-in packages that fail to import, to put first on PYTHONPATH."""
    for name in BARE_MACHINE_MISSING:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on a bare GPU machine (tests/test_gpu_check.py)')\n")
    return directory


def gpu_check(tmp_path: Path, *args: str, bare: bool = False) -> subprocess.CompletedProcess:
    path = [str(block_imports(tmp_path / "blocked"))] if bare else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [str(REPO)]), OMP_NUM_THREADS="1",
               TMPDIR=str(tmp_path))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PICOCHAT_HOME"):
        env.pop(key, None)  # the script makes its own PICOCHAT_HOME (under TMPDIR)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def table_rows(stdout: str) -> dict[str, str]:
    """check name -> PASS/FAIL, from the table printed at the end."""
    table = stdout[stdout.rindex("\ncheck "):].strip().splitlines()
    rows = [line.split("|") for line in table[2:] if "|" in line]
    return {cells[0].strip(): cells[-1].strip() for cells in rows}


@pytest.mark.slow
def test_cpu_dry_run_passes_every_check(tmp_path):
    proc = gpu_check(tmp_path, "--cpu-dry-run", "--out", "report.json", bare=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert table_rows(proc.stdout) == {name: "PASS" for name in DRY_RUN_CHECKS}
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["check"] for c in report["checks"]] == DRY_RUN_CHECKS
    assert report["passed"] and all(c["passed"] for c in report["checks"])
    resume = next(c for c in report["checks"] if c["check"] == "resume")["numbers"]
    assert resume["bitwise_equal"] and resume["killed_after_step"] < resume["steps"]
    assert not list(tmp_path.glob("picochat_gpu_check_*")), "the temporary PICOCHAT_HOME was left behind"


def test_a_failing_check_fails_the_run_and_the_others_still_run(tmp_path):
    proc = gpu_check(tmp_path, "--cpu-dry-run", "--checks", "fused_ops,head_loss", "--inject-failure", "fused_ops")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert table_rows(proc.stdout) == {"fused_ops": "FAIL", "head_loss": "PASS"}
    assert "injected failure" in proc.stdout


def test_help_explains_every_flag(tmp_path):
    proc = gpu_check(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--cpu-dry-run", "--out", "--checks", "--depths", "--steps", "--device-batch-size",
                 "--op-depth", "--head-chunks", "--timeout", "--keep-home"):
        assert flag in proc.stdout
    assert "--inject-failure" not in proc.stdout  # a test hook, not a user flag
