"""
The Python tool's OS sandbox (picochat.tools.run_python in its bubblewrap jail), attacked.

Every attack that got through the old, Python-level sandbox is here, plus a few more. Most of them
first switch the audit hook off (HOOK_OFF empties the sets in its closure, found with gc) or run in
a sub-interpreter, which never had it: what they meet is the OS layer, which must hold alone.
Each attack runs once, concurrently with the others (each is a subprocess that mostly waits), in a
module-scoped fixture, followed by a normal call; the tests then check, attack by attack, that it
ended within its limit, that no secret reached its output, that nothing it wrote appeared outside
(the host's /tmp and /dev/shm, this test's directory, which holds its secret file and sockets), and
that the next call worked. The missing-bwrap cases are at the end.
Run:  python -m pytest tests/test_sandbox.py  (about 15 s on 2 cores)
"""
import glob
import os
import shutil
import socket
import string
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from picochat.common import PicochatError
from picochat.toolbox import run_tool
from picochat.tools import SANDBOX_UIDS, UNSAFE_ENV, run_python

TIMEOUT_S = 2.0
SLACK_S = 2.0  # starting the jail and tearing it down, on a busy 2-core machine
RUN_ID = uuid.uuid4().hex[:8]
SECRET = f"hunter2-{RUN_ID}"
OUTSIDE = (tempfile.gettempdir(), "/dev/shm")  # world-writable places on the host
CHECKOUT_FILE = Path(__file__).resolve().parents[1] / "pyproject.toml"

# Empties the frozensets and tuples in the audit hook's closure (cells are writable), so the hook
# refuses nothing. Prepended to attacks so that they meet the OS layer directly.
HOOK_OFF = """\
import gc
for f in gc.get_objects():
    if getattr(f, '__name__', None) == 'audit' and getattr(f, '__closure__', None):
        for cell in f.__closure__:
            if isinstance(cell.cell_contents, (frozenset, tuple)):
                cell.cell_contents = type(cell.cell_contents)()
"""


def live_processes_of(uids: range) -> list[int]:
    """Pids of processes, not zombies, whose real uid is in `uids`. Read from /proc/PID/status: the
    owner of /proc/PID itself turns to root when a process makes itself non-dumpable."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        if int(fields["Uid"].split()[0]) in uids and not fields["State"].strip().startswith("Z"):
            found.append(int(entry))
    return found


@dataclass
class Attack:
    name: str
    code: str  # a string.Template: $mark (a name unique to the attack), $dir, $secret_file, $home_file,
    #            $checkout_file, $socket_path, $port
    shows: str = ""  # what stdout must contain: proof that the attack got as far as the OS layer
    hidden: str = ""  # one more text its output must not contain
    timeout: float = TIMEOUT_S

    @property
    def mark(self) -> str:
        return f"picochat_attack_{RUN_ID}_{self.name}"


ATTACKS = [
    # The audit hook switched off from Python
    Attack("subinterpreter", "import _xxsubinterpreters as si, os\n"
           "si.run_string(si.create(), \"import os; os.system('id > /dev/shm/$mark; id > /tmp/$mark; "
           "id > $dir/$mark; cat $secret_file')\")\nprint(os.listdir('/dev/shm'))", shows="$mark"),
    Attack("testcapi_subinterpreter", "import _testcapi, os\n"
           "_testcapi.run_in_subinterp(\"import os; os.system('id > /dev/shm/$mark; id > $dir/$mark')\")\n"
           "print(os.listdir('/dev/shm'))", shows="$mark"),
    Attack("gc_hook_tampering", HOOK_OFF + "import os\n"
           "os.system('id > /tmp/$mark; id > /dev/shm/$mark; id > $dir/$mark; echo hook is off')",
           shows="hook is off"),
    # Files that would outlive the run
    Attack("sqlite_writes", "import os, sqlite3\n"
           "for path in ('/dev/shm/$mark', '/tmp/$mark', '$dir/$mark'):\n"
           "    try:\n"
           "        sqlite3.connect(path).execute('create table t (x)')\n"
           "    except sqlite3.Error as e:\n"
           "        print(path, e)\n"
           "print(os.listdir('/tmp'))", shows="$mark"),
    Attack("readline_history", "import os, readline\n"
           "for path in ('/tmp/$mark', '/dev/shm/$mark', '$dir/$mark'):\n"
           "    try:\n"
           "        readline.write_history_file(path)\n"
           "    except OSError as e:\n"
           "        print(path, e)\n"
           "print(os.listdir('/tmp'))", shows="$mark"),
    Attack("posix_shared_memory", "import _posixshmem, os\n"
           "fd = _posixshmem.shm_open('/$mark', os.O_CREAT | os.O_RDWR, 0o600)\n"
           "os.ftruncate(fd, 8 * 2**20)\nos.write(fd, b'x')\nprint(os.listdir('/dev/shm'))", shows="$mark"),
    Attack("os_open_with_dir_fd", "import os\n"
           "for where in ('/tmp', '/dev/shm', '$dir'):\n"
           "    try:\n"
           "        os.write(os.open('$mark', os.O_CREAT | os.O_WRONLY, dir_fd=os.open(where, os.O_RDONLY)), b'x')\n"
           "    except OSError as e:\n"
           "        print(where, e)\n"
           "print(os.listdir('/tmp'))", shows="$mark"),
    Attack("symlink_race", "import os, threading, time\n"
           "done = False\n"
           "def flip():\n"
           "    while not done:\n"
           "        for target in ('safe', '$dir/$mark', '/dev/shm/$mark'):\n"
           "            try:\n"
           "                os.symlink(target, 'next')\n"
           "                os.replace('next', 'link')\n"
           "            except OSError:\n"
           "                pass\n"
           "threading.Thread(target=flip, daemon=True).start()\n"
           "end = time.monotonic() + 0.5\n"
           "while time.monotonic() < end:\n"
           "    try:\n"
           "        with open('link', 'w') as f:\n"
           "            f.write('x')\n"
           "    except OSError:\n"
           "        pass\n"
           "done = True\nprint(os.listdir('/dev/shm'))", shows="$mark"),
    Attack("huge_file", "with open('/tmp/$mark', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)"),
    Attack("fill_tmpfs", "import itertools\nfor i in itertools.count():\n"
           "    with open(f'/tmp/{i}', 'wb') as f:\n        f.write(b'x' * (8 * 2**20 - 1))"),
    # Reading what root can read
    Attack("etc_shadow", HOOK_OFF + "import os\nos.system('cat /etc/shadow')\nprint(open('/etc/shadow').read())"),
    Attack("private_file", HOOK_OFF + "import os\nos.system('cat $secret_file')\n"
           "print(os.listdir('$dir'))\nprint(open('$secret_file').read())"),
    Attack("file_in_home", "print(open('$home_file').read())"),
    Attack("file_in_checkout", "import os\nprint(os.listdir(os.path.dirname('$checkout_file')))\n"
           "print(open('$checkout_file').read())"),
    Attack("environment_secrets", HOOK_OFF + "import os\nprint(dict(os.environ))\n"
           "os.system('cat /proc/*/environ; env')\nprint(open('/proc/1/environ').read())",
           shows="PATH=/usr/bin:/bin"),
    Attack("other_processes", HOOK_OFF + "import os\n"
           "print([open(f'/proc/{p}/cmdline').read() for p in os.listdir('/proc') if p.isdigit()])\n"
           "try:\n    os.kill(1, 9)\nexcept OSError as e:\n    print('hook is off', e)\n"
           "os.system('kill -9 -1')", shows="hook is off", hidden="pytest"),
    # Talking to the host
    Attack("unix_socket_at_a_path", HOOK_OFF + "import socket\ns = socket.socket(socket.AF_UNIX)\n"
           "s.connect('$socket_path')\ns.sendall(b'pwned')"),
    Attack("tcp_to_localhost", HOOK_OFF + "import socket\n"
           "socket.create_connection(('127.0.0.1', $port), timeout=1).sendall(b'pwned')"),
    # Resources
    Attack("fork_bomb", HOOK_OFF + "import os\nwhile True:\n    os.fork()"),
    Attack("thread_flood", "import threading, time\nwhile True:\n"
           "    threading.Thread(target=time.sleep, args=(100,), daemon=True).start()"),
    Attack("sleep_past_the_limit", "import time\ntime.sleep(100)"),
    Attack("allocate_everything", "x = bytearray(10**11)"),
]


class Listener:
    """A socket the host listens on, in a thread, counting the connections that reach it."""

    def __init__(self, family: int, address):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.connections, self.stopped = 0, False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped:
            try:
                self.sock.accept()[0].close()
                self.connections += 1
            except OSError:
                pass  # timeout: look at self.stopped again

    def close(self):
        self.stopped = True
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The host around the jail: a directory with a 0600 secret file and a Unix socket, a secret
    file in the home directory, a TCP listener on 127.0.0.1 and a secret in our environment."""
    test_dir = tmp_path_factory.mktemp("sandbox_attacks")
    secret_file = test_dir / "secret.txt"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)
    home_file = Path.home() / f".picochat_attack_{RUN_ID}"
    home_file.write_text(SECRET)
    home_file.chmod(0o600)
    unix = Listener(socket.AF_UNIX, str(test_dir / "sock"))
    tcp = Listener(socket.AF_INET, ("127.0.0.1", 0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)
        yield {"dir": test_dir, "secret_file": secret_file, "home_file": home_file, "unix": unix, "tcp": tcp,
               "before": sorted(os.listdir(test_dir))}
    unix.close()
    tcp.close()
    home_file.unlink()


@pytest.fixture(scope="module")
def outcomes(world):
    """Each attack, then a normal call, all attacks at once: (result, seconds, next result, code)."""
    values = {"dir": world["dir"], "secret_file": world["secret_file"], "home_file": world["home_file"],
              "checkout_file": CHECKOUT_FILE, "socket_path": world["dir"] / "sock",
              "port": world["tcp"].sock.getsockname()[1]}

    def attempt(attack):
        code = string.Template(attack.code).substitute(values, mark=attack.mark)
        t0 = time.monotonic()
        result = run_python(code, timeout=attack.timeout)
        elapsed = time.monotonic() - t0
        return result, elapsed, run_python("print(6 * 7)")

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip([a.name for a in ATTACKS], pool.map(attempt, ATTACKS)))


def secrets() -> list[str]:
    """Texts no attack's output may contain: our secret, the checkout's files, /etc/shadow."""
    found = [SECRET, CHECKOUT_FILE.read_text()[:200]]
    if os.access("/etc/shadow", os.R_OK):
        found += [line for line in Path("/etc/shadow").read_text().splitlines() if line.strip()]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_contained(attack, world, outcomes):
    result, elapsed, after = outcomes[attack.name]
    assert elapsed < attack.timeout + SLACK_S, (elapsed, result)
    everything = result.stdout + result.stderr
    for secret in [*secrets(), *filter(None, [attack.hidden])]:
        assert secret not in everything, (secret, result)
    if attack.shows:
        assert string.Template(attack.shows).substitute(mark=attack.mark) in result.stdout, result
    for place in (*OUTSIDE, world["dir"]):
        assert glob.glob(os.path.join(place, f"*{attack.mark}*")) == [], place
    assert after.success and after.stdout == "42\n", after


@pytest.mark.slow
def test_the_host_saw_nothing_of_the_attacks(world, outcomes):
    assert sorted(os.listdir(world["dir"])) == world["before"]  # no new files next to the secret
    assert world["secret_file"].read_text() == SECRET and world["home_file"].read_text() == SECRET
    assert (world["unix"].connections, world["tcp"].connections) == (0, 0)
    assert os.environ["HF_TOKEN"] == SECRET


@pytest.mark.slow
def test_limits_stopped_the_resource_attacks(outcomes):
    slept, _, _ = outcomes["sleep_past_the_limit"]
    assert slept.timed_out and slept.error == f"timed out after {TIMEOUT_S:g} s"
    assert outcomes["allocate_everything"][0].memory_exceeded
    assert "File too large" in outcomes["huge_file"][0].error
    assert "No space left on device" in outcomes["fill_tmpfs"][0].error
    assert "Resource temporarily unavailable" in outcomes["fork_bomb"][0].stderr
    if os.geteuid() == 0:  # jails ran under throwaway uids: nothing of them may be left alive
        time.sleep(0.2)
        assert live_processes_of(SANDBOX_UIDS) == []


# -----------------------------------------------------------------------------
# Where bwrap is missing or broken: refuse with one line, unless the user opts in to the weaker mode

def test_without_bwrap_the_tool_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no bwrap
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    with pytest.raises(PicochatError, match="apt-get install bubblewrap") as refused:
        run_python("print(1)")
    message = str(refused.value)
    assert "\n" not in message and "not installed" in message and UNSAFE_ENV in message
    assert run_tool("print(1)") == f"Error: PicochatError: {message}"


def test_a_bwrap_that_cannot_make_namespaces_is_refused_too(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    with pytest.raises(PicochatError, match="No permissions to creating new namespace.*apt-get install bubblewrap"):
        run_python("print(1)")


def test_the_weaker_mode_needs_the_opt_in_and_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(UNSAFE_ENV, "1")
    with pytest.warns(RuntimeWarning, match=f"{UNSAFE_ENV}=1: running model-written code WITHOUT"):
        result = run_python("import os\nprint(6 * 7, os.getcwd())")
    assert result.success and result.stdout.startswith("42 ")
    workdir = result.stdout.split()[1]
    assert os.path.basename(workdir).startswith("picochat_tool_") and not os.path.exists(workdir)
    with pytest.warns(RuntimeWarning):
        assert run_python("import os\nos.system('echo pwned')").error.startswith("PermissionError")


def test_bwrap_is_used_when_it_works_even_with_the_opt_in(monkeypatch):
    monkeypatch.setenv(UNSAFE_ENV, "1")
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed: apt-get install bubblewrap")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: this is not the weaker mode
        assert run_python("import os\nprint(os.getuid())").stdout == "65534\n"
