"""runs/torch_install.py picks the torch build the NVIDIA driver can run, with a fake `nvidia-smi` on PATH."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "runs" / "torch_install.py"
CPU = "torch==2.13.0"
GPU = "torch==2.9.1 --index-url https://download.pytorch.org/whl/"

HEADER = """\
Tue Jan  6 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver:<21}  Driver Version: {driver:<14} CUDA Version: {cuda:<9}|
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |
| N/A   31C    P0             71W /  700W |       1MiB /  81559MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
"""


def fake_nvidia_smi(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def header_script(driver: str, cuda: str, caps: str = "9.0") -> str:
    """Prints the header for plain `nvidia-smi`, one line per GPU for the csv queries."""
    gpus = caps.split()
    cap_lines = "".join(f"{c}\\n" for c in gpus)          # printf's \n, one per GPU
    driver_lines = "".join(f"{driver}\\n" for _ in gpus)
    return (f'case "$*" in\n'
            f'  *compute_cap*) printf "{cap_lines}" ;;\n'
            f'  *driver_version*) printf "{driver_lines}" ;;\n'
            f"  *) cat <<'EOF'\n{HEADER.format(driver=driver, cuda=cuda)}EOF\n  ;;\nesac\n")


def run(tmp_path: Path, **env_extra):
    """The script with PATH = the fake bin dir + the dirs that hold sh and cat (never a real nvidia-smi)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("sh", "cat", "echo"):
        if not (bin_dir / tool).exists() and shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_VARIANT")}
    env.update(PATH=str(bin_dir), **env_extra)
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("driver, cuda, variant", [
    ("560.35.05", "12.6", "cu126"),
    ("565.57.01", "12.7", "cu126"),
    ("570.133.20", "12.8", "cu128"),
    ("575.57.08", "12.9", "cu128"),
    ("580.95.05", "13.0", "cu128"),  # cu130 is experimental for this torch: the newest stable build
    ("590.44.01", "13.1", "cu128"),
])
def test_the_newest_stable_cuda_build_the_driver_supports(tmp_path, driver, cuda, variant):
    fake_nvidia_smi(tmp_path / "bin", header_script(driver, cuda))
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == GPU + variant
    assert proc.stderr == ""


@pytest.mark.parametrize("driver, cuda", [("535.183.01", "12.2"), ("550.127.05", "12.4")])
def test_an_older_12_x_driver_gets_the_closest_build_with_a_note(tmp_path, driver, cuda):
    # CUDA's minor-version compatibility: a 12.6 build runs on any 12.x driver
    fake_nvidia_smi(tmp_path / "bin", header_script(driver, cuda))
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == GPU + "cu126"
    assert f"supports CUDA {cuda}" in proc.stderr and "minor-version compatibility" in proc.stderr


def test_a_driver_too_old_for_every_build_is_a_one_line_error(tmp_path):
    fake_nvidia_smi(tmp_path / "bin", header_script("470.256.02", "11.4"))
    proc = run(tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "CUDA 11.4" in lines[0] and "needs CUDA 12.x" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("cuda, caps, variant", [
    ("13.0", "7.0", "cu128"),      # V100: no Volta kernels in cu130
    ("13.0", "6.0", "cu126"),      # P100: Pascal only in cu126
    ("13.0", "9.0 7.0", "cu128"),  # mixed GPUs: a build for all of them
    ("12.8", "12.0", "cu128"),     # RTX 5090 (Blackwell)
    ("12.9", "8.9", "cu128"),      # L4, RTX 4090 (Ada runs Ampere's sm_86 kernels)
])
def test_the_build_has_kernels_for_the_gpus(tmp_path, cuda, caps, variant):
    fake_nvidia_smi(tmp_path / "bin", header_script("580.95.05", cuda, caps))
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == GPU + variant


def test_a_gpu_no_build_has_kernels_for_is_a_one_line_error(tmp_path):
    fake_nvidia_smi(tmp_path / "bin", header_script("570.86.15", "12.8", "3.7"))  # K80
    proc = run(tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "compute capability 3.7" in proc.stderr


def test_without_a_cuda_version_in_the_header_the_driver_version_decides(tmp_path):
    # an nvidia-smi whose header says N/A and that cannot report compute_cap (old ones exit 2)
    body = ('case "$*" in\n'
            '  *compute_cap*) echo \'Field "compute_cap" is not a valid field to query.\'; exit 2 ;;\n'
            '  *driver_version*) printf "570.86.15\\n570.86.15\\n" ;;\n'
            '  *) echo "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: N/A |" ;;\nesac\n')
    fake_nvidia_smi(tmp_path / "bin", body)
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == GPU + "cu128"
    assert proc.stderr == ""


def test_a_failing_nvidia_smi_means_the_cpu_build(tmp_path):
    fake_nvidia_smi(tmp_path / "bin", 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the '
                                      'NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."\n'
                                      "exit 9\n")
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == CPU
    assert "exit 9" in proc.stderr  # said, not silent


def test_no_nvidia_smi_means_the_cpu_build(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == CPU
    assert proc.stderr == ""


def test_environment_overrides(tmp_path):
    fake_nvidia_smi(tmp_path / "bin", header_script("550.127.05", "12.4"))  # would get cu126; overridden
    assert run(tmp_path, TORCH_SPEC="torch==2.8.0").stdout.strip() == "torch==2.8.0"
    assert run(tmp_path, TORCH_VARIANT="cu126").stdout.strip() == GPU + "cu126"
    assert run(tmp_path, TORCH_VARIANT="cpu").stdout.strip() == CPU
    bad = run(tmp_path, TORCH_VARIANT="cu999")
    assert bad.returncode == 2 and "cu999" in bad.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("cuda, expected", [("11.4", None), ("12.9", GPU + "cu128"), (None, CPU)])
def test_the_makefile_installs_what_the_script_chose_or_stops(tmp_path, cuda, expected):
    """`make -n venv` in a copy of the Makefile: the pip line it would run, or a stop before any command."""
    work = tmp_path / "repo"
    (work / "runs").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", work)
    shutil.copy(ROOT / "pyproject.toml", work)
    shutil.copy(SCRIPT, work / "runs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if cuda:
        fake_nvidia_smi(bin_dir, header_script("470.256.02" if cuda == "11.4" else "575.57.08", cuda))
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_VARIANT", "MAKEFLAGS")}
    # the fake first, then a PATH with no real nvidia-smi (python3 and make must stay reachable)
    real = [d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "nvidia-smi").exists()]
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), *real])
    proc = subprocess.run(["make", "-n", "venv", f"PYTHON={sys.executable}"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    if expected is None:
        assert proc.returncode != 0
        assert "needs CUDA 12.x" in proc.stderr and "no torch build chosen" in proc.stderr
        assert "-m venv" not in proc.stdout  # stopped before creating anything
    else:
        assert proc.returncode == 0, proc.stderr
        assert f"-m pip install -q {expected}\n" in proc.stdout
