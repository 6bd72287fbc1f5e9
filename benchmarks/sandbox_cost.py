"""
What one trivial call of the Python tool's sandbox costs: `run_python("pass")`, per call, median ms.

Three paths, interleaved in rounds so that a machine that gets busier part-way hits all of them
alike: the sandbox as it is now (a cgroup per call, seccomp, code through stdin, a pidfd wait),
the sandbox as it was before issue 21 (picochat/tools.py at --baseline-rev, loaded from git:
code on bwrap's command line, output to files, Popen.wait polling), and a bare `python -I -c pass`
with no jail at all, the floor under any sandbox that starts a fresh interpreter.

Run on a quiet machine (the numbers are wall-clock time):
    python benchmarks/sandbox_cost.py                 # 50 calls per path, in rounds of 10
    python benchmarks/sandbox_cost.py --calls 5       # a quick check that it runs
The old path is left out, with a note, where git or that revision is not there.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from picochat.tools import run_python  # noqa: E402

BEFORE_ISSUE_21 = "53af0a4"  # main just before the per-call cgroup, seccomp and pipes


def load_old_sandbox(rev: str):
    """picochat/tools.py as it was at `rev`, imported under another name, or None (with why)."""
    try:
        source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:picochat/tools.py"], capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"no old path: git show {rev}:picochat/tools.py failed ({getattr(e, 'stderr', e)!s:.80})"
    with tempfile.NamedTemporaryFile("w", suffix="_tools_before.py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("tools_before", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tools_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module, None


def bare_python() -> None:
    subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)


def checked(run):
    def call():
        result = run("pass")
        assert result.success, result  # a failing sandbox would be fast for the wrong reason
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per path (default 50)")
    parser.add_argument("--round", type=int, default=10, help="calls per path in a row (default 10)")
    parser.add_argument("--baseline-rev", default=BEFORE_ISSUE_21, help="git revision of the old sandbox")
    args = parser.parse_args()

    paths = {"sandbox now": checked(run_python)}
    old, why_not = load_old_sandbox(args.baseline_rev)
    if old is not None:
        paths[f"sandbox at {args.baseline_rev}"] = checked(old.run_python)
    paths["bare python -I"] = bare_python
    for call in paths.values():  # warm-up: the jail's one-time probe, page cache
        call()

    times = {name: [] for name in paths}
    while min(len(t) for t in times.values()) < args.calls:
        for name, call in paths.items():
            for _ in range(min(args.round, args.calls - len(times[name]))):
                t0 = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - t0) * 1000)

    now = statistics.median(times["sandbox now"])
    print(f"{'path':<24} {'median ms':>10} {'fastest':>8} {'now / this':>11}   ({args.calls} calls each, "
          f"rounds of {args.round}, {os.cpu_count()} CPUs)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24} {median:>10.1f} {min(values):>8.1f} {now / median:>11.2f}")
    if why_not:
        print(why_not)


if __name__ == "__main__":
    main()
