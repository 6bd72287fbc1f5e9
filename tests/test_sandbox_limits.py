"""
The edges of the Python tool's jail (picochat.tools.run_python), attacked: memory that one call can
pin, the caller's disk, the caller's session keyring, syscalls with a long record of kernel bugs,
and code too long for a command line. Every attack runs through the real jail.

The memory attacks run one at a time with a 64 MB tool limit, so the call's cap (its cgroup's
memory limit) is 64 MiB + the 40 MiB of tmpfs = 104 MiB. While each runs, a thread samples
/proc/meminfo and this process's RSS; afterwards the call's own cgroup peak is in its result. Each
attack is sized to pin 0.4-0.6 GB where nothing stops it, far from this 24 GB machine's limit.
Run:  python -m pytest tests/test_sandbox_limits.py  (about 20 s on 2 cores)
"""
import contextlib
import ctypes
import errno
import os
import platform
import shutil
import string
import tempfile
import threading
import time
import uuid

import pytest

from picochat.common import PicochatError
from picochat.tools import CALL_TASKS, SHM_BYTES, TMP_BYTES, UNSAFE_ENV, run_python

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bwrap is not installed: apt-get install bubblewrap")

MEMORY_MB = 64
CALL_CAP = MEMORY_MB * 2**20 + TMP_BYTES + SHM_BYTES  # what run_python documents for memory_mb=64
# other processes on a shared machine, over the second an attack runs (unlimited, the floods took 360-520 MiB)
MEMINFO_SLACK = 160 * 2**20
CALLER_RSS_SLACK = 32 * 2**20
TIMEOUT_S = 5.0
RUN_ID = uuid.uuid4().hex[:8]
SECRET = f"hunter2-{RUN_ID}"

# The audit hook's closure emptied, so attacks meet the OS layer alone
from test_sandbox import HOOK_OFF  # noqa: E402

# Syscall numbers (the tests call them through libc's syscall(), inside and outside the jail)
SYSCALLS = {
    "x86_64": {"add_key": 248, "request_key": 249, "keyctl": 250, "io_uring_setup": 425, "userfaultfd": 323,
               "perf_event_open": 298, "memfd_secret": 447},
    "aarch64": {"add_key": 217, "request_key": 218, "keyctl": 219, "io_uring_setup": 425, "userfaultfd": 282,
                "perf_event_open": 241, "memfd_secret": 447},
}.get(platform.machine())
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING = 1, 10, -3

MEMORY_ATTACKS = {
    # 4,000 values of 64 KiB on the jail's tmpfs: each is a 128 KiB kernel allocation, 0.5 GB in all
    "xattr_flood": "import os\nopen('f', 'w').close()\nn = 0\ntry:\n"
                   "    for n in range(4000):\n        os.setxattr('f', f'user.k{n}', b'x' * 65536)\n"
                   "except OSError as e:\n    print('stopped at', n, e)\nimport time\ntime.sleep(0.3)",
    # 60 memory files of 8 MiB (the file size rlimit), 480 MB
    "memfd_flood": "import os, time\nfds = []\nfor i in range(60):\n    fd = os.memfd_create(f'm{i}')\n"
                   "    os.write(fd, b'x' * (8 * 2**20 - 1))\n    fds.append(fd)\nprint(len(fds))\ntime.sleep(0.3)",
    # 15 processes of 40 MB each, every one within the 64 MB address-space rlimit: 600 MB
    "fork_flood": HOOK_OFF + "import os, time\nkids = []\nfor i in range(15):\n    pid = os.fork()\n"
                  "    if pid == 0:\n        block = b'x' * (40 * 2**20)\n        time.sleep(1)\n        os._exit(0)\n"
                  "    kids.append(pid)\nprint([os.waitpid(pid, 0)[1] for pid in kids])",
    # empty files until the tmpfs says no: 400,000 of them are about 0.4 GB of inodes and dentries
    "inode_flood": "import os\nn = 0\ntry:\n    for n in range(400_000):\n        os.mknod(str(n))\n"
                   "except OSError as e:\n    print('stopped at', n, e)\nimport time\ntime.sleep(0.3)",
}


def meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def own_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def pinned_now() -> tuple[int, int]:
    """Memory in use on the machine, two ways: what MemAvailable leaves out (which counts tmpfs
    dentries and inodes as reclaimable, though they are not while the files exist), and the kernel's
    slab plus shared memory (tmpfs pages, memfds)."""
    info = meminfo()
    return info["MemTotal"] - info["MemAvailable"], info["Slab"] + info["Shmem"]


class Sampler:
    """While a call runs: the most memory in use on the machine beyond what it was before, and
    the highest RSS of this process."""

    def __init__(self, probe=None):
        self.probe, self.stop = probe, threading.Event()
        self.before, self.rss_before = pinned_now(), own_rss()
        self.pinned, self.highest_rss, self.probed = 0, self.rss_before, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.01):
            self.pinned = max(self.pinned, *[now - then for now, then in zip(pinned_now(), self.before)])
            self.highest_rss = max(self.highest_rss, own_rss())
            if self.probe:
                self.probed.append(self.probe())

    def finish(self):
        self.stop.set()
        self.thread.join()
        return self


@pytest.fixture(scope="module")
def memory_outcomes():
    """Each memory attack alone (so that /proc/meminfo speaks for it): (result, seconds, sampler)."""
    outcomes = {}
    for name, code in MEMORY_ATTACKS.items():
        sampler = Sampler()
        t0 = time.monotonic()
        result = run_python(code, timeout=TIMEOUT_S, memory_mb=MEMORY_MB)
        outcomes[name] = (result, time.monotonic() - t0, sampler.finish())
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("attack", list(MEMORY_ATTACKS))
def test_a_memory_flood_stays_under_the_calls_cap(attack, memory_outcomes):
    result, elapsed, sampler = memory_outcomes[attack]
    assert elapsed < TIMEOUT_S + 2, result
    assert result.memory_peak_bytes is not None and result.memory_peak_bytes <= CALL_CAP, result
    assert sampler.pinned < CALL_CAP + MEMINFO_SLACK, f"{attack}: {sampler.pinned / 2**20:.0f} MiB in use: {result}"
    assert sampler.highest_rss - sampler.rss_before < CALLER_RSS_SLACK
    assert run_python("print(6 * 7)").stdout == "42\n"


@pytest.mark.slow
def test_each_flood_is_stopped_the_way_its_limit_says(memory_outcomes):
    assert "Operation not permitted" in memory_outcomes["xattr_flood"][0].stdout  # user xattrs are refused
    assert "No space left on device" in memory_outcomes["inode_flood"][0].stdout  # tmpfs nr_inodes
    assert memory_outcomes["memfd_flood"][0].memory_exceeded  # the cgroup's limit killed it
    assert memory_outcomes["fork_flood"][0].memory_exceeded


LIMIT_FILES = ("memory.limit_in_bytes", "memory.max", "pids.max")  # cgroup v1, v2, both


def call_cgroups_and_mounts() -> dict[str, dict[str, int]]:
    """The cgroup directories (with their limits) and tmpfs mounts that this process's calls have now."""
    mine, found = f"picochat-{os.getpid()}-", {}
    for parent, subdirs, _ in os.walk("/sys/fs/cgroup"):
        for directory in [os.path.join(parent, n) for n in subdirs if n.startswith(mine)]:
            found[directory] = {}
            with contextlib.suppress(OSError), open(os.path.join(directory, "cgroup.procs")) as f:
                found[directory]["processes"] = len(f.read().split())
            for name in LIMIT_FILES:
                try:
                    with open(os.path.join(directory, name)) as f:
                        found[directory][name] = int(f.read())
                except (OSError, ValueError):
                    pass
    with open("/proc/self/mountinfo") as f:
        return found | {line.split()[4]: {} for line in f if mine in line.split()[4]}


def test_each_call_has_its_own_cgroup_and_tmpfs_removed_afterwards():
    earlier = set(call_cgroups_and_mounts())  # an earlier call's, still being removed
    sampler = Sampler(probe=call_cgroups_and_mounts)
    result = run_python("import time\ntime.sleep(1)\nprint('done')", memory_mb=MEMORY_MB)
    sampler.finish()
    assert result.stdout == "done\n"
    probes = [{path: found for path, found in probe.items() if path not in earlier} for probe in sampler.probed]
    during = max(probes, key=len)
    limits = {name: value for path, found in during.items() for name, value in found.items()}
    assert limits.get("memory.limit_in_bytes", limits.get("memory.max")) == CALL_CAP, during
    assert limits["pids.max"] == CALL_TASKS, during
    # the jail is in every one of them: bwrap's first process in the namespaces, and the code's
    most = {path: max(probe.get(path, {}).get("processes", 0) for probe in probes) for path in during}
    assert all(count >= 2 for path, count in most.items() if path.startswith("/sys/fs/cgroup")), most
    if os.geteuid() == 0:  # as root the jail's /tmp is our own tmpfs mount, with nr_inodes
        assert any(not p.startswith("/sys/fs/cgroup") for p in during), during
    end = time.monotonic() + 2  # removed by the call's own thread, just after it handed back the result
    while set(during) & set(call_cgroups_and_mounts()) and time.monotonic() < end:
        time.sleep(0.01)
    assert not set(during) & set(call_cgroups_and_mounts())


@pytest.mark.parametrize("lacking, patch, warning", [
    ("a memory cgroup", ("_find_cgroups", lambda: "no cgroup hierarchy here has the memory and pids controllers"),
     "WITHOUT a memory limit"),
    ("libseccomp", ("_libseccomp", lambda: None), "WITHOUT the seccomp filter"),
])
def test_a_missing_layer_is_refused_in_one_line_or_opted_out_of(lacking, patch, warning, monkeypatch):
    import picochat.tools as tools
    monkeypatch.setattr(tools, *patch)
    monkeypatch.setattr(tools, "_SETUPS", {})  # look at the machine again (and leave no cached
    monkeypatch.setattr(tools, "_INCOMPLETE", {})  # incomplete setup behind for the next test)
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    with pytest.raises(PicochatError, match=UNSAFE_ENV) as refused:
        run_python("print(1)")
    assert "\n" not in str(refused.value) and ("cgroup" in str(refused.value) or "libseccomp2" in str(refused.value))
    monkeypatch.setenv(UNSAFE_ENV, "1")
    with pytest.warns(RuntimeWarning, match=warning):
        result = run_python("import os\nprint(os.getuid())")
    assert result.stdout == "65534\n"  # still in the jail, only without what is missing
    if lacking == "a memory cgroup":
        assert result.memory_peak_bytes is None


# -----------------------------------------------------------------------------
# The caller's disk: the jail's output is a pipe we read, not a file of ours

def test_fallocate_on_the_output_reserves_nothing_of_the_callers_disk():
    code = HOOK_OFF + ("import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                       "for fd in (1, 2):\n"
                       "    r = libc.fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(2 << 30))  # KEEP_SIZE, 2 GiB\n"
                       "    print('fallocate', fd, r, os.strerror(ctypes.get_errno()), flush=True)\n"
                       "time.sleep(0.5)")
    places = sorted({tempfile.gettempdir(), "/"})
    free = lambda: min(shutil.disk_usage(p).free for p in places)  # noqa: E731
    before, lowest = free(), [free()]
    sampler = Sampler(probe=lambda: lowest.append(free()))
    result = run_python(code, timeout=TIMEOUT_S)
    sampler.finish()
    assert result.success, result
    assert result.stdout.count("fallocate") == 2 and " 0 " not in result.stdout  # both refused
    assert before - min(lowest) < 256 * 2**20, f"{(before - min(lowest)) / 2**30:.1f} GiB reserved: {result}"


def test_output_past_the_stream_limit_stops_the_run():
    t0 = time.monotonic()
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout=TIMEOUT_S)
    assert not result.success and "stdout" in result.error and "MiB" in result.error, result
    assert time.monotonic() - t0 < TIMEOUT_S and not result.timed_out


# -----------------------------------------------------------------------------
# Keyrings and syscalls

def libc_syscall(*args) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return ret, ctypes.get_errno() if ret < 0 else 0


KEYRING_ATTACK = string.Template(HOOK_OFF + """\
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(*args):
    ret = libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return ret, ctypes.get_errno() if ret < 0 else 0
key, err = call($keyctl, $search, $session, b'user', b'$description', 0)
print('search', key, err)
if key > 0:
    buf = ctypes.create_string_buffer(4096)
    print('read', call($keyctl, 11, key, buf, 4096), buf.value)
try:
    print(open('/proc/keys').read())
except OSError as e:
    print('/proc/keys', e)
payload = b'$secret-left'
print('left', call($add_key, b'user', b'$left', payload, len(payload), $session))
""")


@pytest.mark.skipif(SYSCALLS is None, reason=f"no syscall numbers for {platform.machine()} in this test")
def test_the_callers_session_keyring_is_out_of_reach_and_calls_share_none():
    description, left = f"picochat-key-{RUN_ID}", f"picochat-left-{RUN_ID}"
    seen = {}

    def caller_with_a_keyring():  # a thread of its own: joining a session keyring changes only it
        ring, err = libc_syscall(SYSCALLS["keyctl"], KEYCTL_JOIN_SESSION_KEYRING, f"picochat-test-{RUN_ID}".encode())
        if ring < 0:
            seen["skip"] = f"keyctl is not available here ({os.strerror(err)})"
            return
        key, err = libc_syscall(SYSCALLS["add_key"], b"user", description.encode(), SECRET.encode(), len(SECRET),
                                KEY_SPEC_SESSION_KEYRING)
        assert key > 0, os.strerror(err)
        values = dict(keyctl=SYSCALLS["keyctl"], add_key=SYSCALLS["add_key"], search=KEYCTL_SEARCH,
                      session=KEY_SPEC_SESSION_KEYRING, description=description, left=left, secret=SECRET)
        seen["first"] = run_python(KEYRING_ATTACK.substitute(values))
        seen["second"] = run_python(KEYRING_ATTACK.substitute(values, description=left))
        seen["ours"] = [libc_syscall(SYSCALLS["keyctl"], KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, b"user",
                                     name.encode(), 0)[0] for name in (description, left)]

    thread = threading.Thread(target=caller_with_a_keyring)
    thread.start()
    thread.join()
    if "skip" in seen:
        pytest.skip(seen["skip"])
    for result in (seen["first"], seen["second"]):
        assert result.success, result
        assert SECRET not in result.stdout, result
        assert description not in result.stdout and left not in result.stdout, result  # /proc/keys
        assert f"search -1 {errno.EPERM}" in result.stdout, result  # keyctl is denied in the jail
    kept, left_behind = seen["ours"]
    assert kept > 0 and left_behind < 0  # our keyring is as it was: our key still there, nothing added


DENIED = ["io_uring_setup", "userfaultfd", "perf_event_open", "memfd_secret", "keyctl", "add_key", "request_key"]


@pytest.mark.skipif(SYSCALLS is None, reason=f"no syscall numbers for {platform.machine()} in this test")
def test_the_denied_syscalls_fail_with_eperm_inside():
    args = {"io_uring_setup": "1, ctypes.create_string_buffer(256)", "userfaultfd": "1",
            "perf_event_open": "ctypes.create_string_buffer(256), 0, -1, -1, 0", "memfd_secret": "0",
            "keyctl": "0, -3, 0", "add_key": "b'user', b'k', b'v', 1, -3", "request_key": "b'user', b'k', None, 0"}
    code = HOOK_OFF + "import ctypes, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n" + "".join(
        f"r = libc.syscall({SYSCALLS[name]}, {args[name]})\nprint('{name}', r, ctypes.get_errno() if r < 0 else 0)\n"
        for name in DENIED) + ("try:\n    socket.socket(40, socket.SOCK_STREAM)\n    print('vsock 0 0')\n"
                               "except OSError as e:\n    print('vsock -1', e.errno)\n")
    result = run_python(code)
    assert result.success, result
    seen = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert seen == {name: ["-1", str(errno.EPERM)] for name in [*DENIED, "vsock"]}, result.stdout


# -----------------------------------------------------------------------------
# Code size: the code goes through a pipe, never onto a command line

def test_500_kb_of_code_runs_and_never_shows_in_a_command_line():
    marker = f"picochat_big_code_{RUN_ID}"
    code = (f"# {marker}\nx = [\n" + "    1234567890,\n" * 34_000 + "]\n"
            "import time\ntime.sleep(0.5)\nprint(len(x))")
    assert len(code) > 500_000

    def command_lines_with_marker():
        hits = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    hits += [pid] if marker.encode() in f.read() else []
            except OSError:
                pass
        return hits

    sampler = Sampler(probe=command_lines_with_marker)
    result = run_python(code, timeout=TIMEOUT_S)
    sampler.finish()
    assert result.success and result.stdout == "34000\n", result
    assert sampler.probed and not any(sampler.probed)  # no process had the code in its argv
