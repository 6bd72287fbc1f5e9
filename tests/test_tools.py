"""
Tests for picochat/tools.py: the calculator's answers and refusals, the sandbox's happy path, and a
list of hostile programs that must each fail safely (or be contained in the jail), in time, without
leaking a secret or harming the test process. The attacks aimed at the jail itself, with the audit
hook switched off, are in tests/test_sandbox.py.

The hostile programs run once, concurrently (each is a subprocess that mostly waits), in a
module-scoped fixture; each case is then checked by its own parametrized test.
Run:  python -m pytest tests/test_tools.py  (about 15 s on 2 cores)
"""
import os
import re
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from picochat.toolbox import run_tool
from picochat.tools import (MAX_OUTPUT_BYTES, SANDBOX_UID, SANDBOX_UIDS, TOOL_OUTPUT_CHARS, TOOL_TIMEOUT_S,
                            _interpreter_dirs, print_last_expression, run_python, use_calculator)
from test_sandbox import live_processes_of  # tests/ is on sys.path under pytest

SECRET = "secret123"
HOSTILE_TIMEOUT_S = 2.0


# -----------------------------------------------------------------------------
# Calculator

@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"), ("2+3*4", "14"), ("(2+3)*4", "20"), ("2*3+4", "10"), ("-3 + +5", "2"),
    ("10/4", "2.5"), ("12/4", "3"), ("6.0", "6"), ("7//2", "3"), ("-7//2", "-4"), ("7 % 3", "1"),
    ("2**10", "1024"), ("2**-1", "0.5"), ("2**0.5", "1.414213562"), ("10**20", "100000000000000000000"),
    ("1,234+5", "1239"), ("1,234,567 * 2", "2469134"), ("0.1+0.2", "0.3"), ("1/3", "0.3333333333"),
    ("2/3", "0.6666666667"), ("123456789012.5 + 0", "123456789012.5"), ("3e-05 * 1", "0.00003"),
    ("1e20", "100000000000000000000"), ("1e22", "1e+22"), ("1.5e-9", "1.5e-09"),
    ("'strawberry'.count('r')", "3"), ("len('hello')", "5"), ("'Hello'.upper()", "HELLO"),
    ("'Hello'.lower()", "hello"), ("'  hi  '.strip()", "hi"), ("'banana'.replace('a', 'o')", "bonono"),
    ("'hello'[1]", "e"), ("'hello'[1:3]", "el"), ("'hello'[::-1]", "olleh"),
    ("'a,b,c'.count(',')", "2"), ("'mississippi'.count('ss', 0, 5)", "1"),
])
def test_calculator_answers(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "x + 1", "__import__('os')", "().__class__", "'a'.__class__", "().__class__.__base__.__subclasses__()",
    "open('/etc/passwd')", "getattr('a', 'upper')()", "'a'.format(1)", "[c for c in 'abc']", "lambda: 1",
    "True + 1", "'a' * 10**9", "9**9**9", "10**10**10", "2**100000", "1e308 * 10", "(-8) ** (1/3)",
    "1/0", "5 % 0", "'abc'[10]", "'a'.replace('', 'b' * 999).replace('b', 'c' * 999)", "(", "",
    "1" + "+1" * 600, "(" * 500 + "1" + ")" * 500, "-" * 900 + "1",
])
def test_calculator_refuses_quickly_with_an_error_string(expr):
    t0 = time.monotonic()
    answer = use_calculator(expr)
    assert answer.startswith("Error: "), answer
    assert time.monotonic() - t0 < 0.5


def test_calculator_failures_do_not_fall_back_to_python():
    t0 = time.monotonic()
    assert run_tool("1/0") == "Error: division by zero"
    assert run_tool("9**9**9").startswith("Error: exponent")
    assert time.monotonic() - t0 < 0.5  # no subprocess was started


# -----------------------------------------------------------------------------
# Sandbox and run_tool, friendly code

def test_run_python_captures_stdout():
    result = run_python("print('hello')\nprint(__name__)")
    assert result.success and result.stdout == "hello\n__main__\n" and result.error is None


def test_run_python_reports_the_last_traceback_line():
    result = run_python("def f():\n    return 1 / 0\nf()")
    assert not result.success and result.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in result.stderr
    assert run_python("def (").error.startswith("SyntaxError")


def test_run_python_works_in_a_private_tmp_that_is_gone_afterwards():
    code = ("import os, tempfile\nopen('notes.txt', 'w').write('hi')\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\nprint(os.getcwd(), sorted(os.listdir('.')))")
    # an interpreter installed under /tmp (a checkout there) is bound in read-only, so it shows
    from picochat.tools import _interpreter_dirs
    seen = sorted({d.split("/")[2] for d in _interpreter_dirs() if d.startswith("/tmp/")})
    result = run_python(code)
    assert result.success and result.stdout == f"/tmp {sorted(['notes.txt'] + seen)}\n", result
    assert run_python("import os\nprint(sorted(os.listdir('/tmp')))").stdout == f"{seen}\n"


def test_run_python_allows_threads_and_truncates_output():
    assert run_python("import threading\nt = threading.Thread(target=print, args=('t',))\n"
                      "t.start()\nt.join()").stdout == "t\n"
    assert len(run_python("print('x' * 50_000)").stdout) < MAX_OUTPUT_BYTES + 50


NAMESPACES = ("net", "pid", "user", "mnt", "ipc", "uts")


def test_the_jail_is_in_place():
    """What the code sees: its own namespaces, uid 65534 without capabilities, only system files
    and the interpreter on the filesystem, and the rlimits."""
    code = ("import os\nprint(os.getuid(), os.getgid())\n"
            f"print(*[os.readlink(f'/proc/self/ns/{{ns}}') for ns in {NAMESPACES}])\n"
            "print(*sorted(os.listdir('/')))\nprint(open('/proc/self/status').read())\n"
            "print(open('/proc/self/limits').read())")
    result = run_python(code, memory_mb=200)
    ids, namespaces, top = result.stdout.splitlines()[:3]
    assert ids == f"{SANDBOX_UID} {SANDBOX_UID}"
    for ns, seen in zip(NAMESPACES, namespaces.split()):
        assert seen != os.readlink(f"/proc/self/ns/{ns}"), ns
    expected_top = {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "tmp", "usr"}
    assert set(top.split()) <= expected_top | {d.split("/")[1] for d in _interpreter_dirs()}
    assert re.search(r"CapEff:\s+0+\n", result.stdout) and re.search(r"NoNewPrivs:\s+1\n", result.stdout)
    assert re.search(r"Max processes\s+16\s+16", result.stdout)
    assert re.search(rf"Max address space\s+{200 * 2**20}\s", result.stdout)
    assert re.search(r"Max file size\s+\d+\s", result.stdout)
    assert re.search(r"Max core file size\s+0\s", result.stdout)


def test_print_last_expression_rewrites_only_a_final_expression():
    assert print_last_expression("x = 1") == "x = 1"
    assert print_last_expression("print(2)") == "print(2)"
    assert print_last_expression("def (") == "def ("
    assert "print(_)" in print_last_expression("x = 6\nx * 7")


@pytest.mark.parametrize("code, expected", [
    ("2+2", "4"), ("'strawberry'.count('r')", "3"), ("x = 6\nx * 7", "42"), ("print('a')", "a"),
    ("import math\nmath.sqrt(16)", "4.0"), ("sorted([3, 1, 2])", "[1, 2, 3]"), ("x = 1", ""),
    ("[].sort()", ""), ("raise ValueError('boom')", "Error: ValueError: boom"),
])
def test_run_tool(code, expected):
    assert run_tool(code) == expected


def test_run_tool_output_is_short_and_it_never_raises():
    assert len(run_tool("print('y' * 10_000)")) == TOOL_OUTPUT_CHARS
    assert run_tool(None).startswith("Error: ")


# -----------------------------------------------------------------------------
# Hostile code: each case fails (or, for reading cases, reveals nothing secret) within its limit

TMP = tempfile.gettempdir()
RUN_ID = uuid.uuid4().hex[:8]
ESCAPE = f"picochat_escape_{RUN_ID}"  # a name that must never appear in TMP
CANARY_DIR = os.path.join(TMP, f"picochat_canary_{RUN_ID}")
CANARY_FILE = os.path.join(CANARY_DIR, "keep.txt")
FAIL, NO_SECRET, TIMEOUT, MEMORY = "fail", "no_secret", "timeout", "memory"
CONTAINED = "contained"  # may succeed, inside the jail: the no-trace and parent-unharmed tests check it
WRAP_CLOSE = "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"


@dataclass
class Hostile:
    name: str
    code: str
    expect: str = FAIL


HOSTILE = [
    # new processes
    Hostile("os_system", "import os\nos.system('echo pwned')"),
    Hostile("os_popen", "import os\nprint(os.popen('echo pwned').read())"),
    Hostile("subprocess_popen", "import subprocess\nsubprocess.Popen(['echo', 'pwned'])"),
    Hostile("subprocess_via_importlib",
            "import importlib\nimportlib.import_module('subprocess').run(['echo', 'pwned'])"),
    Hostile("posixsubprocess_import", "import _posixsubprocess"),
    Hostile("fork_bomb", "import os\nwhile True:\n    os.fork()"),
    Hostile("posix_fork", "import posix\nposix.fork()"),
    Hostile("execv", "import os\nos.execv('/bin/echo', ['echo', 'pwned'])"),
    Hostile("posix_spawn", "import os\nos.posix_spawn('/bin/echo', ['echo', 'pwned'], {})"),
    Hostile("spawnlp", "import os\nos.spawnlp(os.P_WAIT, 'echo', 'echo', 'pwned')"),
    Hostile("pty_spawn", "import pty\npty.spawn(['echo', 'pwned'])"),
    Hostile("multiprocessing",
            "import multiprocessing\nmultiprocessing.Process(target=print, args=('pwned',)).start()"),
    Hostile("process_pool", "from concurrent.futures import ProcessPoolExecutor\n"
                            "print(ProcessPoolExecutor().submit(abs, -1).result())"),
    Hostile("fresh_posix_module",
            "import sys\ndel sys.modules['posix']\nimport posix\nposix.system('echo pwned')"),
    Hostile("second_audit_hook", "import sys\nsys.addaudithook(lambda event, args: None)\n"
                                 "import os\nos.system('echo pwned')"),
    # escapes through introspection and dynamic code
    Hostile("subclasses_wrap_close", f"{WRAP_CLOSE}.__init__.__globals__['system']('echo pwned')"),
    Hostile("subclasses_sys_modules",
            f"g = {WRAP_CLOSE}.__init__.__globals__\ng['sys'].modules['posix'].system('echo pwned')"),
    Hostile("exec_string", "exec(\"import os; os.system('echo pwned')\")"),
    Hostile("eval_string", "eval(\"__import__('os').system('echo pwned')\")"),
    Hostile("dunder_import_os", "__import__('os').system('echo pwned')"),
    Hostile("frame_builtins",
            "import sys\nsys._getframe(1).f_builtins['__import__']('os').system('echo pwned')"),
    # network and native code
    Hostile("socket_connect", "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)"),
    Hostile("socket_dunder_import", "__import__('socket').socket()"),
    Hostile("socket_importlib", "import importlib\nimportlib.import_module('socket')"),
    Hostile("raw_socket_module", "import _socket\n_socket.socket()"),
    Hostile("urllib", "import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=1)"),
    Hostile("ctypes_system", "import ctypes\nctypes.CDLL(None).system(b'echo pwned')"),
    # writing outside the working directory
    Hostile("open_write_tmp", f"open({os.path.join(TMP, ESCAPE)!r}, 'w').write('x')", CONTAINED),
    Hostile("open_write_parent_dir", f"open('../{ESCAPE}', 'w').write('x')"),
    Hostile("os_open_creat", f"import os\nos.open({os.path.join(TMP, ESCAPE)!r}, os.O_CREAT | os.O_WRONLY)", CONTAINED),
    Hostile("os_open_dir_fd", f"import os\nfd = os.open({TMP!r}, os.O_RDONLY)\n"
                              f"os.open({ESCAPE!r}, os.O_CREAT | os.O_WRONLY, dir_fd=fd)", CONTAINED),
    Hostile("pathlib_write", f"import pathlib\npathlib.Path({os.path.join(TMP, ESCAPE)!r}).write_text('x')", CONTAINED),
    Hostile("fileio_write", f"import io\nio.FileIO({os.path.join(TMP, ESCAPE)!r}, 'w')", CONTAINED),
    Hostile("symlink_then_write", f"import os\nos.symlink({os.path.join(TMP, ESCAPE)!r}, 'link')\n"
                                  "open('link', 'w').write('x')", CONTAINED),
    Hostile("chdir_then_write", f"import os\nos.chdir({TMP!r})\nopen({ESCAPE!r}, 'w').write('x')", CONTAINED),
    Hostile("rmtree_outside", f"import shutil\nshutil.rmtree({CANARY_DIR!r})"),
    Hostile("remove_outside", f"import os\nos.remove({CANARY_FILE!r})"),
    Hostile("rename_outside", f"import os\nos.rename({CANARY_FILE!r}, 'stolen.txt')"),
    Hostile("chmod_outside", f"import os\nos.chmod({CANARY_FILE!r}, 0o777)"),
    Hostile("huge_file", "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)"),
    Hostile("huge_stdout", "while True:\n    print('x' * 10_000)"),
    # secrets and other processes
    Hostile("environ", "import os\nprint(dict(os.environ))", NO_SECRET),
    Hostile("proc_self_environ", "print(open('/proc/self/environ').read())", NO_SECRET),
    Hostile("etc_passwd", "print(open('/etc/passwd').read()[:200])", NO_SECRET),
    Hostile("proc_parent_environ", "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", NO_SECRET),
    Hostile("kill_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)", CONTAINED),
    Hostile("killpg_parent", "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGTERM)", CONTAINED),
    Hostile("pidfd_kill_parent",
            "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGTERM)", CONTAINED),
    # resources
    Hostile("huge_allocation", "x = bytearray(10**10)", MEMORY),
    Hostile("growing_allocation", "a = []\nwhile True:\n    a.append(bytearray(10**7))", MEMORY),
    Hostile("infinite_loop", "while True:\n    pass", TIMEOUT),
    Hostile("sleep_forever", "import time\ntime.sleep(1000)", TIMEOUT),
    Hostile("huge_power", "print(9**9**9)"),
    Hostile("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)"),
    Hostile("deep_recursion_raised_limit", "import sys\nsys.setrecursionlimit(10**7)\n"
                                           "def f(n):\n    return f(n + 1)\nf(0)"),
    Hostile("thread_flood", "import threading, time\nwhile True:\n"
                            "    threading.Thread(target=time.sleep, args=(100,), daemon=True).start()"),
    Hostile("raise_rlimit", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"),
    Hostile("sys_exit", "import sys\nsys.exit(0)"),
    Hostile("read_stdin", "input()"),
]


@pytest.fixture(scope="module")
def hostile_outcomes():
    """Run every hostile case through run_python and run_tool, concurrently, with a secret in our env."""
    os.makedirs(CANARY_DIR)
    with open(CANARY_FILE, "w") as f:
        f.write("keep")
    os.chmod(CANARY_FILE, 0o644)

    def attempt(case):
        t0 = time.monotonic()
        result = run_python(case.code, timeout=HOSTILE_TIMEOUT_S)
        t1 = time.monotonic()
        tool_output = run_tool(case.code)
        return result, t1 - t0, tool_output, time.monotonic() - t1

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = dict(zip([c.name for c in HOSTILE], pool.map(attempt, HOSTILE)))
        yield outcomes
    for path in (CANARY_FILE,):
        if os.path.exists(path):
            os.remove(path)
    os.rmdir(CANARY_DIR)


def test_hostile_list_is_long_enough():
    assert len(HOSTILE) >= 30 and len({c.name for c in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_code_fails_safely(case, hostile_outcomes):
    result, elapsed, tool_output, tool_elapsed = hostile_outcomes[case.name]
    assert elapsed < HOSTILE_TIMEOUT_S + 2 and tool_elapsed < TOOL_TIMEOUT_S + 2
    everything = result.stdout + result.stderr + tool_output
    assert SECRET not in everything and "pwned" not in result.stdout
    assert isinstance(tool_output, str) and len(tool_output) <= TOOL_OUTPUT_CHARS
    if case.expect not in (NO_SECRET, CONTAINED):
        assert not result.success, result
        assert result.error and tool_output.startswith("Error: "), (result, tool_output)
    if case.expect == TIMEOUT:
        assert result.timed_out
    if case.expect == MEMORY:
        assert result.memory_exceeded, result


def test_hostile_code_left_no_trace_outside_its_directory(hostile_outcomes):
    assert not os.path.lexists(os.path.join(TMP, ESCAPE))
    with open(CANARY_FILE) as f:
        assert f.read() == "keep"
    assert os.stat(CANARY_FILE).st_mode & 0o777 == 0o644


def test_parent_is_unharmed_after_hostile_code(hostile_outcomes):
    assert os.environ["HF_TOKEN"] == SECRET
    assert run_python("print(6 * 7)").stdout == "42\n"
    if os.geteuid() == 0:  # sandboxes ran under throwaway uids: none of them may be left alive
        time.sleep(0.1)
        assert live_processes_of(SANDBOX_UIDS) == []
