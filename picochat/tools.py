"""
Two of the tools a chat model can call: the calculator and the Python sandbox. Which tool answers a
`<|python_start|>code<|python_end|>` block is decided by picochat/toolbox.py (the tools by name,
the dispatcher, the bounds; docs/TOOLS.md); HumanEval-style evals call `run_python` directly
(docs/DESIGN.md#tool-use).

- `use_calculator(expr)`: arithmetic and a few string methods (`'strawberry'.count('r')`), evaluated
  by walking the AST of an allow-list. Nothing is ever passed to eval/exec, so there is no escape to
  block and no subprocess to pay for; sizes and exponents are capped, and a deadline stops the walk.
  Always returns a string; failures start with "Error: ".
- `run_python(code)`: a fresh `python -I -S` in a bubblewrap (`bwrap`) jail, the boundary; the threat
  model and what each layer stops are in docs/SECURITY.md. The jail has its own PID, IPC, UTS,
  network, cgroup, mount and user namespaces; the code is uid 65534 with no capabilities and cannot
  make user namespaces; its filesystem is /usr, /lib* and the interpreter's own prefix (and
  virtualenv) read-only, a fresh /proc, a minimal /dev and private, size-limited /tmp (the working
  directory) and /dev/shm in memory: no home, no checkout, no /etc, nothing of the host's /tmp.
  As root, a privileged bwrap builds that and drops to a throwaway uid before the inner, unprivileged
  bwrap makes the user namespace (see _jail_argv for why). Each call has its own cgroup, made and
  removed by the caller, whose memory limit covers everything of the call (processes, tmpfs pages,
  memory files, kernel objects) and which has a pids limit; a seccomp filter (built with libseccomp)
  denies io_uring, userfaultfd, perf_event_open, memfd_secret, keyrings, xattrs and AF_VSOCK, and
  the jail gets a fresh session keyring. The code comes through stdin and the output goes back
  through capped pipes: nothing of the host (no file, no command line) carries either. Inside, a
  prelude sets rlimits (address space, CPU seconds, file size, open files, 16 processes or
  threads, no core dumps) and adds an audit hook, a first line that refuses starting programs,
  sockets and ctypes with a clear error (code can get past it: the jail does not rely on it). The
  environment is scrubbed, and at the wall-clock timeout bwrap is killed, which takes the whole PID
  namespace down. Where a layer cannot be had (bwrap missing or unable to make namespaces, no
  memory cgroup, no libseccomp), `run_python` raises a one-line PicochatError saying what to do,
  unless PICOCHAT_UNSAFE_SANDBOX=1 opts in to running with what there is (a RuntimeWarning on each
  call names what is missing).
  sys.exit() counts as a failure: the code did not run to its end.
- `python_tool(code)`: the python tool, the sandbox for 3 s (TOOL_TIMEOUT_S), printing the value of
  a final expression like a notebook cell. `calculate(expr)` is the calculator's value or its
  exception (NotArithmetic: not calculator arithmetic, so Python's to answer).

Run the tests:  python -m pytest tests/test_tools.py tests/test_sandbox.py tests/test_sandbox_limits.py
Try it:         python -c "from picochat.toolbox import run_tool; print(run_tool('2**10 / 4'))"
"""
from __future__ import annotations

import ast
import contextlib
import ctypes
import errno
import itertools
import math
import operator
import os
import re
import select
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass


# -----------------------------------------------------------------------------
# Calculator: an AST walk over an allow-list, in-process

CALC_MAX_CHARS = 1000  # longer than any arithmetic a model writes; beyond it, it is code
CALC_MAX_INT_BITS = 1000  # about 300 decimal digits
CALC_MAX_EXPONENT = 1000
CALC_MAX_STRING = 10_000
CALC_TIME_LIMIT_S = 1.0
STRING_METHODS = {"count", "upper", "lower", "replace", "strip"}


class NotArithmetic(ValueError):
    """The text is not something the calculator evaluates (a name, a statement...): try Python."""


class ArithmeticFailure(ValueError):
    """Calculator arithmetic that fails on its own terms: division by zero, a result too large."""


# A comma between a digit and exactly three more digits is a thousands separator ("1,234,567");
# string literals are matched first and kept, so "'a,b'.count(',')" is left alone.
_THOUSANDS_COMMA = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|(?<=\d),(?=\d{3}(?!\d))""")

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
               ast.Pow: operator.pow}


def _number(value):
    if type(value) not in (int, float):
        raise NotArithmetic(f"arithmetic on {type(value).__name__} values is not calculator arithmetic")
    return value


def _checked(value):
    if isinstance(value, complex):
        raise ArithmeticFailure("the result is a complex number")
    if isinstance(value, int) and value.bit_length() > CALC_MAX_INT_BITS:
        raise ArithmeticFailure(f"the result has more than {CALC_MAX_INT_BITS * 3 // 10} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ArithmeticFailure("the result is too large for a float")
    return value


def _check_power(base, exponent):
    if abs(exponent) > CALC_MAX_EXPONENT:
        raise ArithmeticFailure(f"exponent {exponent} is too large (at most {CALC_MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if (abs(base).bit_length() - 1) * exponent > CALC_MAX_INT_BITS:
            raise ArithmeticFailure(f"{base}**{exponent} has more than {CALC_MAX_INT_BITS * 3 // 10} digits")


def _string(value, what):
    if type(value) is not str:
        raise NotArithmetic(f"{what} works on strings, got {type(value).__name__}")
    return value


def _evaluate(node, deadline):
    if time.monotonic() > deadline:
        raise ArithmeticFailure(f"evaluation took longer than {CALC_TIME_LIMIT_S:g} s")
    ev = lambda child: _evaluate(child, deadline)  # noqa: E731
    if isinstance(node, ast.Expression):
        return ev(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float, str):
            return node.value
        raise NotArithmetic(f"the constant {node.value!r} is not a number or a string")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _number(ev(node.operand))
        return _checked(-value if isinstance(node.op, ast.USub) else +value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _number(ev(node.left)), _number(ev(node.right))
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _checked(_BINARY_OPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ArithmeticFailure("division by zero") from None
        except OverflowError:
            raise ArithmeticFailure("the result is too large for a float") from None
    if isinstance(node, ast.Call):
        return _call(node, ev)
    if isinstance(node, ast.Subscript):
        text = _string(ev(node.value), "indexing")
        parts = node.slice
        try:
            if isinstance(parts, ast.Slice):
                bounds = [None if p is None else ev(p) for p in (parts.lower, parts.upper, parts.step)]
                if any(b is not None and type(b) is not int for b in bounds):
                    raise NotArithmetic("slice bounds must be integers")
                return text[slice(*bounds)]
            index = ev(parts)
            if type(index) is not int:
                raise NotArithmetic("a string index must be an integer")
            return text[index]
        except (IndexError, ValueError) as e:
            if isinstance(e, NotArithmetic):
                raise
            raise ArithmeticFailure(str(e)) from None
    if isinstance(node, ast.Name):
        raise NotArithmetic(f"the name {node.id!r} is not something the calculator knows")
    raise NotArithmetic(f"{type(node).__name__} is not allowed in the calculator")


def _call(node, ev):
    if node.keywords:
        raise NotArithmetic("keyword arguments are not allowed in the calculator")
    func = node.func
    if isinstance(func, ast.Name) and func.id == "len" and len(node.args) == 1:
        return len(_string(ev(node.args[0]), "len()"))
    if not (isinstance(func, ast.Attribute) and func.attr in STRING_METHODS):
        raise NotArithmetic(f"only len() and the string methods {sorted(STRING_METHODS)} can be called")
    text = _string(ev(func.value), f".{func.attr}()")
    args = [ev(a) for a in node.args]
    if any(type(a) not in (str, int) for a in args):
        raise ArithmeticFailure(f".{func.attr}() takes strings and integers")
    if func.attr == "replace" and len(args) >= 2 and type(args[0]) is str and type(args[1]) is str:
        old, new = args[0], args[1]  # size the result before building it: replace can multiply
        hits = text.count(old) if old else len(text) + 1
        if len(args) > 2 and type(args[2]) is int and args[2] >= 0:
            hits = min(hits, args[2])
        if len(text) + hits * (len(new) - len(old)) > CALC_MAX_STRING:
            raise ArithmeticFailure(f"the result would be longer than {CALC_MAX_STRING} characters")
    try:
        return getattr(str, func.attr)(text, *args)
    except (TypeError, ValueError) as e:
        raise ArithmeticFailure(f".{func.attr}(): {e}") from None


def calculate(expr: str):
    """The value of a calculator expression; raises NotArithmetic or ArithmeticFailure."""
    if not isinstance(expr, str):
        raise NotArithmetic(f"the calculator takes a string, got {type(expr).__name__}")
    if len(expr) > CALC_MAX_CHARS:
        raise NotArithmetic(f"the calculator takes at most {CALC_MAX_CHARS} characters, got {len(expr)}")
    text = _THOUSANDS_COMMA.sub(lambda m: m.group(1) or "", expr.strip())
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes
        raise NotArithmetic(f"not a single expression ({e.__class__.__name__}: {e})") from None
    except (RecursionError, MemoryError):
        raise ArithmeticFailure("the expression is nested too deeply") from None
    try:
        return _evaluate(tree, time.monotonic() + CALC_TIME_LIMIT_S)
    except RecursionError:
        raise ArithmeticFailure("the expression is nested too deeply") from None


def format_value(value) -> str:
    """Integral numbers as ints ("6.0" -> "6"), other floats to 10 significant digits, no 1e+11 noise."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    text = f"{value:.10g}"
    if "e" in text and 1e-6 <= abs(value) < 1e21:  # e.g. 123456789012.5 or 0.00003
        text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text


def use_calculator(expr: str) -> str:
    """Evaluate arithmetic ("1,234 + 5", "2**10 / 3") or a string question ("'strawberry'.count('r')",
    "len('hello')"). Returns the result as text, or "Error: ..." (never raises, never takes > ~1 s)."""
    try:
        return format_value(calculate(expr))
    except (NotArithmetic, ArithmeticFailure) as e:
        return f"Error: {e}"
    except Exception as e:  # a bug here must not take the engine down
        return f"Error: {type(e).__name__}: {e}"


# -----------------------------------------------------------------------------
# Python sandbox: a fresh interpreter in a bubblewrap jail (threat model: docs/SECURITY.md)

MAX_CODE_CHARS = 1_000_000  # the code travels through a pipe, never on a command line
MAX_OUTPUT_BYTES = 10_000  # per stream, kept in the result
MAX_STREAM_BYTES = 8 * 2**20  # a stream past this stops the run (we read, and drop, all past MAX_OUTPUT_BYTES)
MAX_FILE_BYTES = 8 * 2**20  # RLIMIT_FSIZE: any file the code writes, memory files included
MAX_OPEN_FILES = 64
MAX_PROCESSES = 16  # RLIMIT_NPROC, threads included, counted in the jail's own user namespace
CALL_TASKS = 32  # pids.max of a call's cgroup: the code's 16, plus bwrap, setpriv and the shell before them
TMP_BYTES = 32 * 2**20  # the jail's /tmp, also its working directory (tmpfs: memory, gone afterwards)
SHM_BYTES = 8 * 2**20  # the jail's /dev/shm
TMP_INODES = 4096  # files and directories in /tmp and /dev/shm together (as root, the tmpfs's nr_inodes)
SANDBOX_PATH = "/usr/bin:/bin"
SANDBOX_UID = 65534  # "nobody": the code's uid and gid inside its user namespace
SANDBOX_UIDS = range(1_000_000, 1_000_000 + 2**24)  # as root: the throwaway uid outside, above any account's
UNSAFE_ENV = "PICOCHAT_UNSAFE_SANDBOX"  # "1": run with the layers this machine has, warning of those it lacks
CGROUP_ENV = "PICOCHAT_SANDBOX_CGROUP"  # cgroup v2: a directory, delegated to us, to make the calls' cgroups in
MOUNTS_DIR = "/run/picochat-sandbox"  # as root: each call's tmpfs is mounted here while it runs

# Runs inside the child before the user code: it reads the code from stdin (then points stdin at
# /dev/null), sets the rlimits, then adds an audit hook. The hook is a first line only: it turns
# the obvious moves (start a program, open a socket, load native code) into a clear error, but code
# can get past it (a sub-interpreter has no hook), so it is not the boundary.
_GUARD_PRELUDE = r'''
import sys

def _read_code():
    import os
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return code

def _install_guards(memory_bytes, cpu_seconds, max_processes, max_file_bytes, max_open_files):
    import resource

    def limit(kind, value):
        hard = resource.getrlimit(kind)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass  # not supported here (e.g. RLIMIT_AS on macOS)
    limit(resource.RLIMIT_AS, memory_bytes)
    limit(resource.RLIMIT_CPU, cpu_seconds)
    limit(resource.RLIMIT_FSIZE, max_file_bytes)
    limit(resource.RLIMIT_NOFILE, max_open_files)
    limit(resource.RLIMIT_CORE, 0)
    if max_processes:
        limit(resource.RLIMIT_NPROC, max_processes)

    # frozensets: code that finds this closure (gc.get_objects()) cannot empty them
    refused = frozenset({"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn"})
    refused_prefixes = ("subprocess.", "_posixsubprocess.", "socket.", "ctypes.")
    blocked_modules = frozenset({"subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing",
                                 "pty", "socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes"})

    def audit(event, args):
        if event in refused or event.startswith(refused_prefixes):
            raise PermissionError(f"{event} is disabled in the picochat sandbox")
        if event == "import" and args[0].partition(".")[0] in blocked_modules:
            raise ImportError(f"import {args[0]} is disabled in the picochat sandbox", name=args[0])
    sys.addaudithook(audit)

def _use_packages(site_dirs):
    # -S skipped site.main(): no .pth file runs (an editable install's finder alone costs ~10 ms and
    # points at a checkout the jail does not have), yet the installed packages stay importable
    import site
    site.setquit()  # exit() and quit(), as in a normal interpreter
    sys.path.extend(site_dirs)

def _run_user_code(code):
    try:
        exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:  # exit() is not a way to succeed: the code did not run to its end
        sys.stderr.write(f"SystemExit: {e.code}\n")
        sys.exit(1)
'''


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None  # the last line of the traceback, or why the run was stopped
    timed_out: bool = False
    memory_exceeded: bool = False
    memory_peak_bytes: int | None = None  # the call's cgroup at its fullest: processes, tmpfs, kernel objects


# --- Seccomp: a deny-list compiled to BPF by libseccomp (through ctypes), loaded by bwrap --seccomp

# Each fails with EPERM in the jail; everything else stays as the kernel has it. Each is kernel
# attack surface that Python code has no use for, or a way around a limit.
DENIED_SYSCALLS = (
    "io_uring_setup", "io_uring_enter", "io_uring_register",  # a second syscall interface with its own CVE record
    "userfaultfd",  # pauses the kernel mid-copy: the usual way to win a kernel race
    "perf_event_open",  # performance counters: side channels, and a long CVE record
    "memfd_secret",  # memory that even the kernel does not map
    "keyctl", "add_key", "request_key",  # kernel keyrings: the caller's keys, and a channel between calls
    "setxattr", "lsetxattr", "fsetxattr", "setxattrat",  # kernel memory that not every kernel's memcg counts
)
AF_VSOCK = 40  # socket(AF_VSOCK, ...) is denied too: it reaches the hypervisor, past the network namespace
_SCMP_ACT_ALLOW, _SCMP_ACT_ERRNO, _SCMP_CMP_EQ = 0x7FFF0000, 0x00050000, 4  # libseccomp's seccomp.h


class _ScmpArgCmp(ctypes.Structure):  # libseccomp's struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _libseccomp():
    """libseccomp (Debian: libseccomp2) through ctypes, or None where it is not installed."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype, lib.seccomp_init.argtypes = ctypes.c_void_p, [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _seccomp_program(lib) -> bytes:
    """The jail's filter as BPF, for bwrap --seccomp. libseccomp also makes it kill any syscall made
    through another architecture's entry (int 0x80 on x86_64), where these numbers would not apply."""
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        def deny(name, *conditions):
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number == -1:  # unknown to this libseccomp (setxattrat, Linux 6.13, before libseccomp 2.6)
                return
            array = (_ScmpArgCmp * len(conditions))(*conditions) if conditions else None
            if (rc := lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ERRNO | errno.EPERM, number, len(conditions),
                                                 array)) < 0:
                raise OSError(-rc, f"libseccomp refused the rule for {name}")
        for name in DENIED_SYSCALLS:
            deny(name)
        deny("socket", _ScmpArgCmp(0, _SCMP_CMP_EQ, AF_VSOCK, 0))
        fd = os.memfd_create("picochat-seccomp")
        try:
            if (rc := lib.seccomp_export_bpf(ctx, fd)) < 0:
                raise OSError(-rc, "libseccomp could not export the filter")
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _join_fresh_session_keyring(keyctl_number: int) -> None:
    """Give the calling thread a new, empty session keyring in place of the caller's (only this
    thread's credentials change; the jail it starts inherits them): the caller's keys are then not
    even listed in the jail's /proc/keys."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(keyctl_number), ctypes.c_long(1), None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):  # no keys in this kernel, or keyctl is filtered for us too
            raise OSError(err, f"no fresh session keyring for the jail: {os.strerror(err)}")


# --- Cgroups: each call in its own, with a memory and a pids limit, made and removed by the caller

@dataclass
class _CgroupParents:
    """Where this process makes its calls' cgroups: cgroup v2, one directory (memory and pids
    enabled for its children); cgroup v1, our own cgroup in the memory and the pids hierarchies."""
    version: int
    dirs: list[str]


def _own_cgroups() -> dict[str, tuple[str, str]]:
    """Hierarchy ('memory', 'pids' for cgroup v1, '' for v2) -> (its mount point, our cgroup's directory)."""
    with open("/proc/self/cgroup") as f:
        paths = {}
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            paths.update({c: path for c in (controllers.split(",") if controllers else [""])})
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3].split(",")
            keys = [""] if fstype == "cgroup2" else [o for o in options if o in ("memory", "pids")] \
                if fstype == "cgroup" else []
            root, mountpoint = fields[3].rstrip("/"), fields[4]
            for key in keys:
                path = paths.get(key)
                if path is not None and (path + "/").startswith(root + "/"):
                    found[key] = (mountpoint, mountpoint + path[len(root):].rstrip("/"))
    return found


def _find_cgroups() -> _CgroupParents | str:
    """Where to make the calls' cgroups, or why nothing on this machine can limit a call's memory."""
    found = _own_cgroups()
    if "" in found:  # cgroup v2, where it has the memory controller
        mountpoint, own = found[""]
        with open(os.path.join(mountpoint, "cgroup.controllers")) as f:
            has_memory = {"memory", "pids"} <= set(f.read().split())
        if has_memory:
            # a non-root cgroup that holds processes cannot give controllers to its children, so our
            # own works only at the real root; as root, a cgroup of our own under the root works
            candidates = ([os.environ[CGROUP_ENV]] if os.environ.get(CGROUP_ENV) else
                          [own] + ([os.path.join(mountpoint, "picochat-sandbox")] if os.geteuid() == 0 else []))
            tried = []
            for parent in candidates:
                try:
                    os.makedirs(parent, exist_ok=True)
                    with open(os.path.join(parent, "cgroup.subtree_control"), "r+") as f:
                        if not {"memory", "pids"} <= set(f.read().split()):
                            f.write("+memory +pids")
                    return _CgroupParents(2, [parent])
                except OSError as e:
                    tried.append(f"{parent}: {e.strerror}")
            return (f"no cgroup v2 directory takes the calls' cgroups ({'; '.join(tried)}): set {CGROUP_ENV} to "
                    f"one delegated to this user with memory and pids in cgroup.subtree_control, or run as root")
    if "memory" in found and "pids" in found:
        dirs = list(dict.fromkeys([found["memory"][1], found["pids"][1]]))  # one, where both are mounted together
        if all(os.access(d, os.W_OK) for d in dirs):
            return _CgroupParents(1, dirs)
        return f"this user cannot make cgroups in {' or '.join(dirs)} (cgroup v1): run as root"
    return "no cgroup hierarchy here has the memory and pids controllers"


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


class _CallCgroup:
    """One call's cgroup: made before the call, the jail moved in before it starts, removed after."""

    def __init__(self, parents: _CgroupParents, name: str, memory_bytes: int):
        self.version, self.dirs = parents.version, [os.path.join(p, name) for p in parents.dirs]
        # swap limited too (where swap accounting exists), so that tmpfs pages cannot move out of the count;
        # v2's oom.group ends the whole call at its first OOM kill
        limits = ({"memory.max": memory_bytes, "memory.swap.max": 0, "memory.oom.group": 1} if self.version == 2
                  else {"memory.limit_in_bytes": memory_bytes, "memory.memsw.limit_in_bytes": memory_bytes})
        try:
            for directory in self.dirs:
                os.mkdir(directory)
                for file, value in {**limits, "pids.max": CALL_TASKS}.items():
                    if os.path.exists(os.path.join(directory, file)):
                        _write(os.path.join(directory, file), value)
        except OSError:
            self.remove()
            raise

    def add(self, pid: int) -> None:
        for directory in self.dirs:
            _write(os.path.join(directory, "cgroup.procs"), pid)

    def _read(self, file: str) -> str | None:
        for directory in self.dirs:
            with contextlib.suppress(OSError), open(os.path.join(directory, file)) as f:
                return f.read()
        return None

    def peak_bytes(self) -> int | None:
        peak = self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        return int(peak) if peak else None

    def oom_kills(self) -> int:
        counts = self._read("memory.events" if self.version == 2 else "memory.oom_control") or ""
        return sum(int(line.split()[1]) for line in counts.splitlines() if line.startswith("oom_kill "))

    def remove(self) -> None:
        for directory in self.dirs:
            for _ in range(20):  # the last exits can lag the wait by a moment; past that, the sweep gets it
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)


# --- The jail's writable space, as root: a tmpfs of our own with size= and nr_inodes=, bound in

_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2


def _mount_tmpfs(path: str) -> None:
    """A fresh tmpfs at `path` with a tmp/ and a shm/ in it (bwrap's own --tmpfs takes no nr_inodes)."""
    os.makedirs(MOUNTS_DIR, mode=0o700, exist_ok=True)
    os.mkdir(path, 0o700)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"size={TMP_BYTES + SHM_BYTES},nr_inodes={TMP_INODES},mode=0755".encode()
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV), options) != 0:
        err = ctypes.get_errno()
        os.rmdir(path)
        raise OSError(err, f"cannot mount a tmpfs on {path}: {os.strerror(err)}")
    for sub in ("tmp", "shm"):
        os.mkdir(os.path.join(path, sub))
        os.chmod(os.path.join(path, sub), 0o1777)


def _unmount(path: str) -> None:
    ctypes.CDLL(None, use_errno=True).umount2(path.encode(), _MNT_DETACH)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _sweep_stale(places: list[str]) -> None:
    """Remove what the calls of dead processes left behind (a caller killed mid-call): tmpfs mounts
    and cgroups named picochat-PID-N."""
    for parent in places:
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                match = re.fullmatch(r"picochat-(\d+)-\d+", name)
                if match and not os.path.exists(f"/proc/{match.group(1)}"):
                    if parent == MOUNTS_DIR:
                        _unmount(os.path.join(parent, name))
                    else:
                        with contextlib.suppress(OSError):
                            os.rmdir(os.path.join(parent, name))


# --- The jail's command line

def _unavailable(missing: list[tuple[str, str]]) -> Exception:
    """The one-line error for a machine that lacks a layer of the sandbox: what is wrong, what to
    install, and the explicit opt-in to the weaker mode (never chosen silently)."""
    from picochat.common import PicochatError  # lazily: picochat.common imports torch
    return PicochatError(f"the Python tool's sandbox cannot run here: {'; '.join(why for _, why in missing)} "
                         f"(or set {UNSAFE_ENV}=1 to run model-written code without "
                         f"{' and '.join(layer for layer, _ in missing)}, much less safely)")


def _interpreter_dirs() -> list[str]:
    """What the interpreter needs outside /usr: its install prefix (e.g. pyenv's
    /root/.pyenv/versions/X) and the virtualenv it runs from. Only these directories are bound,
    never the home or the checkout around them."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    dirs = sorted(p for p in prefixes if p != "/usr" and not p.startswith("/usr/"))
    home = os.path.realpath(os.path.expanduser("~"))
    for path in dirs:
        if path in ("/", home):
            raise _unavailable([("the bubblewrap sandbox", f"Python is installed right in {path}, which the "
                                                           f"sandbox would have to expose whole")])
    return dirs


def _filesystem_args(writable: str | None) -> list[str]:
    """The jail's whole filesystem: system files and the interpreter read-only, a fresh /proc, a
    minimal /dev, private /tmp and /dev/shm in memory (`writable`'s tmp/ and shm/, or bwrap's
    size-limited tmpfs). Nothing else exists in it: no home, no checkout, no $PICOCHAT_HOME, no
    /etc, no host /tmp or its Unix sockets."""
    args = ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr symlinks, or real directories
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    # The private mounts first: the interpreter may live under /tmp (a checkout there), and its
    # read-only bind must land on top of the jail's /tmp, not be hidden by it.
    args += ["--proc", "/proc", "--dev", "/dev"]
    if writable:
        args += ["--bind", f"{writable}/tmp", "/tmp", "--bind", f"{writable}/shm", "/dev/shm"]
    else:
        args += ["--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
                 "--perms", "1777", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm"]
    dirs, parents = _interpreter_dirs(), set()
    for path in dirs:
        while (path := os.path.dirname(path)) not in ("/", "/tmp", "/dev", "/dev/shm"):  # those exist
            parents.add(path)
    # bwrap gives the directories it creates on the way to a bind their host modes (/root: 0700);
    # the jail's uid must be able to walk down to the interpreter
    for parent in sorted(parents, key=len):
        args += ["--perms", "0755", "--dir", parent]
    for path in dirs:
        args += ["--ro-bind", path, path]
    # last, read-only: the tmpfs bwrap made for / and /dev (as a normal user they belong to the
    # jail's uid, memory it could fill without a size limit)
    return args + ["--remount-ro", "/dev", "--remount-ro", "/"]


# --unshare-all but the user namespace, which comes separately so that, as root, it can be made
# inside the privileged layer (see _jail_argv)
_NAMESPACES = ["--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
               "--new-session", "--die-with-parent"]
# An unprivileged user namespace: uid 65534 with no capabilities, which cannot make user namespaces
# of its own (a usual first step of kernel exploits)
_USER_NAMESPACE = ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                   "--cap-drop", "ALL", "--die-with-parent"]
def _jail_argv(bwrap: str, outside_uid: int | None, options: list[str], writable: str | None) -> list[str]:
    """The command line that runs the command appended to it in the jail; `options` go to the bwrap
    that builds the namespaces (the seccomp filter, the cgroup hand-over).

    As a normal user (outside_uid None), one unprivileged bwrap does it all. As root, one bwrap would
    map the jail to uid 0 outside: the kernel exempts uid 0 from RLIMIT_NPROC (no fork bomb limit),
    and uid 0 owns root's files. So a privileged bwrap builds the namespaces and the filesystem (only
    root can reach an interpreter under /root) and loads the seccomp filter, keeps no capability but
    setuid/setgid, and setpriv drops to `outside_uid`, a throwaway uid, whose inner unprivileged bwrap
    adds the user namespace on that same filesystem."""
    filesystem = _filesystem_args(writable)
    if outside_uid is None:
        return [bwrap, *_NAMESPACES, *_USER_NAMESPACE, *filesystem, *options, "--chdir", "/tmp", "--"]
    drop_to = ["setpriv", f"--reuid={outside_uid}", f"--regid={outside_uid}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    return [bwrap, *_NAMESPACES, "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            *filesystem, *options, "--", *drop_to,
            bwrap, *_USER_NAMESPACE, "--dev-bind", "/", "/", "--chdir", "/tmp", "--"]  # dev: /dev/null works


def _fresh_uid() -> int:
    """A throwaway uid no account uses, so that RLIMIT_NPROC and file ownership concern this run only."""
    return SANDBOX_UIDS.start + int.from_bytes(os.urandom(3), "little")


def _python() -> str:
    """Our interpreter's path without '..' (python started as ../.venv/bin/python has it), which
    the jail could not resolve: the directory it steps out of is not there."""
    return os.path.normpath(sys.executable)


def _sandbox_env(home: str) -> dict[str, str]:
    return {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
            # one BLAS thread: numpy's per-core thread pools would not fit RLIMIT_NPROC/RLIMIT_AS
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- What this machine gives: each layer, or why it is missing

@dataclass
class _Setup:
    bwrap: str | None  # None: no jail (the opt-in weaker mode)
    as_root: bool
    seccomp: bytes | None
    keyctl_number: int | None  # to give each jail a fresh session keyring
    cgroups: _CgroupParents | None
    missing: list[tuple[str, str]]  # (the layer, why it is missing and what to do)


_SETUP_LOCK = threading.Lock()  # look once, even when many threads start sandboxes together
_SETUPS: dict[tuple[str | None, bool], _Setup] = {}  # complete setups; an incomplete one is looked at again
_INCOMPLETE: dict[tuple[str | None, bool], tuple[float, _Setup]] = {}  # ... but at most once a minute
RECHECK_S = 60.0
_CALL_NUMBERS = itertools.count()


def _sandbox_setup() -> _Setup:
    bwrap, as_root = shutil.which("bwrap"), os.geteuid() == 0
    with _SETUP_LOCK:
        if (bwrap, as_root) in _SETUPS:
            return _SETUPS[(bwrap, as_root)]
        when, cached = _INCOMPLETE.get((bwrap, as_root), (float("-inf"), None))
        if time.monotonic() - when < RECHECK_S:  # the weaker mode's calls do not each probe a jail
            return cached
        missing = []
        lib = _libseccomp()
        if lib is None:
            missing.append(("the seccomp filter and a fresh session keyring",
                            "libseccomp is not installed: apt-get install libseccomp2"))
        cgroups = _find_cgroups()
        if isinstance(cgroups, str):
            missing.append(("a memory limit", cgroups))
            cgroups = None
        setup = _Setup(bwrap, as_root, lib and _seccomp_program(lib),
                       lib and lib.seccomp_syscall_resolve_name(b"keyctl"), cgroups, missing)
        if bwrap is None:
            missing.insert(0, ("the bubblewrap sandbox",
                               "bwrap is not installed (not on PATH): apt-get install bubblewrap"))
        elif as_root and shutil.which("setpriv") is None:
            missing.insert(0, ("the bubblewrap sandbox", "setpriv (util-linux), which bwrap needs as root, is not on "
                                                         "PATH: apt-get install util-linux"))
        elif reason := _probe(setup):
            missing.insert(0, ("the bubblewrap sandbox", f"{reason}: apt-get install bubblewrap"))
        if missing and missing[0][0] == "the bubblewrap sandbox":
            setup.bwrap = None
        if not missing:
            _sweep_stale([MOUNTS_DIR, *cgroups.dirs])
            _SETUPS[(bwrap, as_root)] = setup
        else:
            _INCOMPLETE[(bwrap, as_root)] = (time.monotonic(), setup)
        return setup


def _probe(setup: _Setup) -> str | None:
    """None if the jail works on this machine, else why not. Checks that the jailed interpreter is
    ours, extension modules included (a missing bind could otherwise pick up another Python)."""
    same_python = (f"import math, os, sys\n"
                   f"assert sys.version == {sys.version!r} and os.__file__ == {os.__file__!r}")
    try:
        done = _run([_python(), "-I", "-c", same_python], b"", setup, None, "/tmp", time.monotonic() + 30)
    except OSError as e:
        return f"{setup.bwrap} could not be run ({e})"
    if done.returncode != 0:
        lines = done.stderr.text().strip().splitlines()
        return f"{setup.bwrap} fails here ({lines[-1] if lines else f'exit status {done.returncode}'})"
    return None


# --- One run: start, feed the code, read capped output, wait without polling, clean up

class _Capture:
    """One output stream as it is read: its head (stdout) or its tail (stderr, where the last
    line of a traceback is), at most MAX_OUTPUT_BYTES, and how many bytes came in all."""

    def __init__(self, tail: bool):
        self.tail, self.kept, self.total = tail, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.tail:
            self.kept += chunk
            del self.kept[:-MAX_OUTPUT_BYTES]
        else:
            self.kept += chunk[:MAX_OUTPUT_BYTES - len(self.kept)]

    def text(self) -> str:
        text, cut = self.kept.decode("utf-8", errors="replace"), self.total - len(self.kept)
        if not cut:
            return text
        return f"[... {cut} bytes cut ...]\n{text}" if self.tail else text + "\n[... cut ...]"


@dataclass
class _Finished:
    returncode: int
    stdout: _Capture
    stderr: _Capture
    timed_out: bool = False
    overflowed: str | None = None  # the stream that passed MAX_STREAM_BYTES
    memory_peak_bytes: int | None = None
    oom_kills: int = 0


def _in_a_thread_of_its_own(keyctl_number: int | None, work):
    """work(publish) in a new thread that first joins a fresh session keyring (credentials are per
    thread: ours stay as they are, and the jail it starts inherits the new one). The caller gets
    what work publishes as soon as it does; the thread goes on to clean up (unmount, remove the
    cgroup), and it must live that long anyway: bwrap's --die-with-parent fires when the *thread*
    that started it ends."""
    outcome, ready = {}, threading.Event()

    def publish(value):
        outcome["value"] = value
        ready.set()

    def run():
        try:
            if keyctl_number is not None:
                _join_fresh_session_keyring(keyctl_number)
            work(publish)
        except BaseException as e:  # raised again in the caller's thread, unless it came after the result
            outcome.setdefault("error", e)
        finally:
            ready.set()

    threading.Thread(target=run, name="picochat-sandbox-run").start()
    ready.wait()
    if "value" not in outcome:
        raise outcome["error"]
    return outcome["value"]


def _run(command: list[str], code: bytes, setup: _Setup, memory_bytes: int | None, cwd: str,
         deadline: float) -> _Finished:
    """Run `command` (in the jail where setup has one), its stdin `code`, until it ends or the
    deadline; each stream read through a pipe as it comes, at most MAX_STREAM_BYTES."""
    keyctl_number = setup.keyctl_number if setup.bwrap else None
    return _in_a_thread_of_its_own(keyctl_number, lambda publish: _run_here(command, code, setup, memory_bytes,
                                                                            cwd, deadline, publish))


def _run_here(command: list[str], code: bytes, setup: _Setup, memory_bytes: int | None, cwd: str,
              deadline: float, publish) -> None:
    if setup.bwrap is None:  # the weaker mode: no jail, so no cgroup, seccomp filter or keyring either
        proc = subprocess.Popen(command, cwd=cwd, env=_sandbox_env(cwd), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, bufsize=0)
        try:
            finished = _collect(proc, code, deadline)
        finally:
            _end(proc)
        finished.returncode = proc.returncode
        return publish(finished)
    name = f"picochat-{os.getpid()}-{next(_CALL_NUMBERS)}"
    with contextlib.ExitStack() as cleanup:
        open_fds = set()  # our pipe ends, each closed once (a number closed twice may be another thread's by then)
        cleanup.callback(lambda: [os.close(fd) for fd in open_fds])

        def pipe() -> tuple[int, int]:
            ends = os.pipe()
            open_fds.update(ends)
            return ends

        def close(fd: int) -> None:
            open_fds.remove(fd)
            os.close(fd)

        cgroup, options, passed = None, [], []
        if memory_bytes and setup.cgroups:
            cgroup = _CallCgroup(setup.cgroups, name, memory_bytes)
            cleanup.callback(cgroup.remove)
            # bwrap reports its first process inside the namespaces, then holds it (before it forks the
            # command) until we have moved it into the cgroup: all the code does is born inside
            (info_read, info_write), (block_read, block_write) = pipe(), pipe()
            options += ["--info-fd", str(info_write), "--block-fd", str(block_read)]
            passed += [info_write, block_read]
        if setup.seccomp is not None:
            seccomp_read, seccomp_write = pipe()  # the filter is a few hundred bytes: the pipe holds it whole
            os.write(seccomp_write, setup.seccomp)
            close(seccomp_write)
            options += ["--seccomp", str(seccomp_read)]
            passed.append(seccomp_read)
        writable = None
        if setup.as_root:
            writable = os.path.join(MOUNTS_DIR, name)
            _mount_tmpfs(writable)
            cleanup.callback(_unmount, writable)  # before the cgroup goes: its pages are freed first
        outside_uid = _fresh_uid() if setup.as_root else None
        proc = subprocess.Popen([*_jail_argv(setup.bwrap, outside_uid, options, writable), *command], cwd=cwd,
                                env=_sandbox_env("/tmp"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=passed, start_new_session=True, bufsize=0)
        cleanup.callback(_end, proc)
        for fd in passed:
            close(fd)  # bwrap has them now
        if cgroup and (jail_pid := _jail_pid(info_read, deadline)) is not None:
            cgroup.add(jail_pid)
            os.write(block_write, b"x")
        finished = _collect(proc, code, deadline)
        _end(proc)
        if cgroup:
            finished.memory_peak_bytes, finished.oom_kills = cgroup.peak_bytes(), cgroup.oom_kills()
        finished.returncode = proc.returncode
        publish(finished)  # the unmount and the cgroup's removal happen after the caller has its result


def _jail_pid(info_fd: int, deadline: float) -> int | None:
    """The pid (ours) of bwrap's first process in the namespaces, from its --info-fd JSON; None if
    bwrap ended before it got that far."""
    data = b""
    while (match := re.search(rb'"child-pid": (\d+)', data)) is None:  # bwrap writes it in one write()
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([info_fd], [], [], left)[0] or not (chunk := os.read(info_fd, 4096)):
            return None
        data += chunk
    return int(match.group(1))


def _end(proc: subprocess.Popen) -> None:
    """Whatever happened, the run is over: the jail killed if it still runs (bwrap's death takes its
    PID namespace down, every process of the code), then reaped. Safe to call twice."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


def _collect(proc: subprocess.Popen, code: bytes, deadline: float) -> _Finished:
    """Feed stdin and read stdout and stderr as they come, until the process has exited and both
    streams are closed, a stream passes MAX_STREAM_BYTES, or the deadline. The exit is a pidfd in
    the same select(), so nothing polls."""
    finished = _Finished(0, _Capture(tail=False), _Capture(tail=True))
    streams = {proc.stdout.fileno(): ("stdout", finished.stdout), proc.stderr.fileno(): ("stderr", finished.stderr)}
    pending, stdin_fd = memoryview(code), proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux before 5.3: the wait below polls
        pidfd = None
    with contextlib.ExitStack() as cleanup, selectors.DefaultSelector() as selector:
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
        if pidfd is not None:
            cleanup.callback(os.close, pidfd)
            selector.register(pidfd, selectors.EVENT_READ)
        exited_at = None
        while streams or (pidfd is not None and exited_at is None):
            # once it has exited, its streams get a moment: unjailed, a leftover child may hold them
            end = deadline if exited_at is None else min(deadline, exited_at + 0.5)
            if (left := end - time.monotonic()) <= 0:
                finished.timed_out = exited_at is None
                break
            for key, _ in selector.select(left):
                if key.fd == stdin_fd:
                    try:
                        pending = pending[os.write(stdin_fd, pending[:2**16]):]
                    except BlockingIOError:
                        continue
                    except OSError:  # it closed its stdin (exited, or will not read the rest)
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(stdin_fd)
                        proc.stdin.close()
                elif key.fd == pidfd:
                    exited_at = time.monotonic()
                    selector.unregister(pidfd)
                else:
                    name, capture = streams[key.fd]
                    if chunk := os.read(key.fd, 2**16):
                        capture.add(chunk)
                        if capture.total > MAX_STREAM_BYTES:
                            finished.overflowed = name
                    else:
                        selector.unregister(key.fd)
                        del streams[key.fd]
            if finished.overflowed:
                break
    if pidfd is None and not (finished.timed_out or finished.overflowed):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            finished.timed_out = True
    if finished.timed_out or finished.overflowed:
        _end(proc)
    return finished


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 256) -> ExecutionResult:
    """Run `code` in a fresh `python -I` inside the bubblewrap jail and return what happened (never
    raises for bad code). The call's cgroup holds it to memory_mb MiB plus the 40 MiB of its tmpfs,
    all its processes and kernel objects together. Raises PicochatError, one line, where a layer of
    the sandbox cannot run and the user did not opt in to the weaker mode with
    PICOCHAT_UNSAFE_SANDBOX=1. The working directory is the jail's private /tmp, gone afterwards."""
    if not isinstance(code, str) or len(code) > MAX_CODE_CHARS:
        size = len(code) if isinstance(code, str) else type(code).__name__
        return ExecutionResult(False, "", "", error=f"code must be a string of at most {MAX_CODE_CHARS} "
                                                    f"characters, got {size}")
    setup = _sandbox_setup()
    if setup.missing:
        if os.environ.get(UNSAFE_ENV) != "1":
            raise _unavailable(setup.missing)
        warnings.warn(f"{UNSAFE_ENV}=1: running model-written code WITHOUT "
                      f"{' and '.join(layer for layer, _ in setup.missing)} "
                      f"({'; '.join(why for _, why in setup.missing)}); only what is left stands in its way",
                      RuntimeWarning, stacklevel=2)
    jail = setup.bwrap is not None
    memory_bytes = memory_mb * 2**20 + TMP_BYTES + SHM_BYTES
    workdir = (contextlib.nullcontext("/tmp") if jail else
               tempfile.TemporaryDirectory(prefix="picochat_tool_", ignore_cleanup_errors=True))
    with workdir as home:
        # RLIMIT_NPROC counts per uid: in the jail, its own; unjailed, ours (every process we have)
        guards = (f"_install_guards({memory_mb * 2**20}, {math.ceil(timeout) + 1}, {MAX_PROCESSES if jail else 0}, "
                  f"{MAX_FILE_BYTES}, {MAX_OPEN_FILES})")
        script = (f"{_GUARD_PRELUDE}\n_code = _read_code()\n_use_packages({site.getsitepackages()!r})\n{guards}\n"
                  f"del _install_guards, _read_code, _use_packages\n_run_user_code(_code)\n")
        done = _run([_python(), "-I", "-S", "-u", "-c", script], code.encode("utf-8", "surrogatepass"), setup,
                    memory_bytes, "/" if jail else home, time.monotonic() + timeout)
    stdout, stderr, rc = done.stdout.text(), done.stderr.text(), done.returncode
    killed_by = -rc if rc < 0 else rc - 128 if jail and rc > 128 else None  # bwrap reports signal N as 128 + N
    timed_out = done.timed_out or killed_by == signal.SIGXCPU  # the CPU rlimit fired before the wall clock
    success = rc == 0 and not timed_out and not done.overflowed
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif done.overflowed:
        error = f"{done.overflowed} passed {MAX_STREAM_BYTES // 2**20} MiB; the run was stopped"
    elif not success and done.oom_kills and killed_by is not None:
        error = f"killed at the call's memory limit ({memory_bytes // 2**20} MiB, tmpfs included)"
    elif not success:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1].strip() if lines else f"exited with {_exit_reason(rc, killed_by)}"
    memory_exceeded = done.oom_kills > 0 or (not success and "MemoryError" in stderr)
    return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded, done.memory_peak_bytes)


def _exit_reason(rc: int, killed_by: int | None) -> str:
    if killed_by is None:
        return f"status {rc}"
    try:
        return f"signal {signal.Signals(killed_by).name}"
    except ValueError:
        return f"signal {killed_by}"


# -----------------------------------------------------------------------------
# The python tool, as the dispatcher calls it (picochat/toolbox.py)

TOOL_TIMEOUT_S = 3.0
TOOL_OUTPUT_CHARS = 500  # every tool's answer is cut to this many characters (picochat/toolbox.py)


def print_last_expression(code: str) -> str:
    """Rewrite code so the value of a final expression line is printed, like a notebook cell
    (unless it is None, or already a print call). Code that does not parse is returned as is."""
    try:
        tree = ast.parse(code)
        last = tree.body[-1] if tree.body else None
        if not isinstance(last, ast.Expr):
            return code
        call = last.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print":
            return code
        show = ast.parse("_ = None\nif _ is not None:\n    print(_)").body
        show[0].value = last.value
        tree.body[-1:] = show
        return ast.unparse(ast.fix_missing_locations(tree))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code


def python_tool(code: str) -> str:
    """The python tool: `code` in the sandbox for TOOL_TIMEOUT_S, printing the value of a final
    expression like a notebook cell. Its output, or "Error: ..."; raises PicochatError where the
    sandbox cannot run (the dispatcher turns that into an error string too)."""
    result = run_python(print_last_expression(code), timeout=TOOL_TIMEOUT_S)
    return result.stdout.rstrip() if result.success else f"Error: {result.error}"
