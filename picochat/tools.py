"""
The tools a chat model can call: a calculator and a Python sandbox.

The engine sees `<|python_start|>code<|python_end|>` in a sample, calls `run_tool(code)` and forces
`<|output_start|>` + result + `<|output_end|>` into the sequence (docs/DESIGN.md#tool-use). HumanEval-style evals call
`run_python` directly (docs/DESIGN.md#tool-use).

- `use_calculator(expr)`: arithmetic and a few string methods (`'strawberry'.count('r')`), evaluated
  by walking the AST of an allow-list. Nothing is ever passed to eval/exec, so there is no escape to
  block and no subprocess to pay for; sizes and exponents are capped, and a deadline stops the walk.
  Always returns a string; failures start with "Error: ".
- `run_python(code)`: a fresh `python -I` in a bubblewrap (`bwrap`) jail, the boundary; the threat
  model and what each layer stops are in docs/SECURITY.md. The jail has its own PID, IPC, UTS,
  network, cgroup, mount and user namespaces; the code is uid 65534 with no capabilities and cannot
  make user namespaces; its filesystem is /usr, /lib* and the interpreter's own prefix (and
  virtualenv) read-only, a fresh /proc, a minimal /dev and private, size-limited /tmp (the working
  directory) and /dev/shm in memory: no home, no checkout, no /etc, nothing of the host's /tmp.
  As root, a privileged bwrap builds that and drops to a throwaway uid before the inner, unprivileged
  bwrap makes the user namespace (see _jail_argv for why). Inside, a prelude sets rlimits (address
  space, CPU seconds, file size, open files, 16 processes or threads, no core dumps) and adds an
  audit hook, a first line that refuses starting programs, sockets and ctypes with a clear error
  (code can get past it: the jail does not rely on it). The environment is scrubbed, stdin is
  /dev/null, and at the wall-clock timeout bwrap is killed, which takes the whole PID namespace down.
  Where bwrap is missing or cannot make namespaces, `run_python` raises a one-line PicochatError
  saying what to install, unless PICOCHAT_UNSAFE_SANDBOX=1 opts in to running without the jail
  (rlimits and the audit hook only, with a RuntimeWarning on each call site).
  sys.exit() counts as a failure: the code did not run to its end.
- `run_tool(code)`: calculator first; if the text is not calculator arithmetic, the sandbox (3 s),
  printing the value of a final expression like a notebook cell. Short string, never raises.

Run the tests:  python -m pytest tests/test_tools.py tests/test_sandbox.py
Try it:         python -c "from picochat.tools import run_tool; print(run_tool('2**10 / 4'))"
"""
from __future__ import annotations

import ast
import contextlib
import math
import operator
import os
import re
import shutil
import signal
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


def _calculate(expr: str):
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
        return format_value(_calculate(expr))
    except (NotArithmetic, ArithmeticFailure) as e:
        return f"Error: {e}"
    except Exception as e:  # a bug here must not take the engine down
        return f"Error: {type(e).__name__}: {e}"


# -----------------------------------------------------------------------------
# Python sandbox: a fresh interpreter in a bubblewrap jail (threat model: docs/SECURITY.md)

MAX_CODE_CHARS = 100_000  # the code travels on the command line (Linux allows 128 KiB per argument)
MAX_OUTPUT_BYTES = 10_000  # per stream, kept in the result
MAX_FILE_BYTES = 8 * 2**20  # RLIMIT_FSIZE: any file, stdout and stderr included (they are files)
MAX_OPEN_FILES = 64
MAX_PROCESSES = 16  # RLIMIT_NPROC, threads included, counted in the jail's own user namespace
TMP_BYTES = 32 * 2**20  # the jail's /tmp, also its working directory (tmpfs: memory, gone afterwards)
SHM_BYTES = 8 * 2**20  # the jail's /dev/shm
SANDBOX_PATH = "/usr/bin:/bin"
SANDBOX_UID = 65534  # "nobody": the code's uid and gid inside its user namespace
SANDBOX_UIDS = range(1_000_000, 1_000_000 + 2**24)  # as root: the throwaway uid outside, above any account's
UNSAFE_ENV = "PICOCHAT_UNSAFE_SANDBOX"  # "1": where bwrap cannot run, run anyway on the Python layer alone

# Runs inside the child before the user code: the rlimits, then an audit hook. The hook is a first
# line only: it turns the obvious moves (start a program, open a socket, load native code) into a
# clear error, but code can get past it (a sub-interpreter has no hook), so it is not the boundary.
_GUARD_PRELUDE = r'''
import sys

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


def _unavailable(reason: str) -> Exception:
    """The one-line error for a machine where the jail cannot run: what is wrong, what to install,
    and the explicit opt-in to the weaker mode (never chosen silently)."""
    from picochat.common import PicochatError  # lazily: picochat.common imports torch
    return PicochatError(f"the Python tool needs the bubblewrap sandbox, but {reason}: apt-get install bubblewrap "
                         f"(or set {UNSAFE_ENV}=1 to run model-written code without it, much less safely)")


def _interpreter_dirs() -> list[str]:
    """What the interpreter needs outside /usr: its install prefix (e.g. pyenv's
    /root/.pyenv/versions/X) and the virtualenv it runs from. Only these directories are bound,
    never the home or the checkout around them."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    dirs = sorted(p for p in prefixes if p != "/usr" and not p.startswith("/usr/"))
    home = os.path.realpath(os.path.expanduser("~"))
    for path in dirs:
        if path in ("/", home):
            raise _unavailable(f"Python is installed right in {path}, which the sandbox would have to expose whole")
    return dirs


def _filesystem_args() -> list[str]:
    """The jail's whole filesystem: system files and the interpreter read-only, a fresh /proc, a
    minimal /dev, private size-limited /tmp and /dev/shm in memory. Nothing else exists in it: no
    home, no checkout, no $PICOCHAT_HOME, no /etc, no host /tmp or its Unix sockets."""
    args = ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr symlinks, or real directories
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    # The private mounts first: the interpreter may live under /tmp (a checkout there), and its
    # read-only bind must land on top of the jail's /tmp, not be hidden by it.
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
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


def _jail_argv(bwrap: str, outside_uid: int | None) -> list[str]:
    """The command line that runs the command appended to it in the jail.

    As a normal user (outside_uid None), one unprivileged bwrap does it all. As root, one bwrap would
    map the jail to uid 0 outside: the kernel exempts uid 0 from RLIMIT_NPROC (no fork bomb limit),
    and uid 0 owns root's files. So a privileged bwrap builds the namespaces and the filesystem (only
    root can reach an interpreter under /root), keeps no capability but setuid/setgid, and setpriv drops
    to `outside_uid`, a throwaway uid, whose inner unprivileged bwrap adds the user namespace on that
    same filesystem."""
    if outside_uid is None:
        return [bwrap, *_NAMESPACES, *_USER_NAMESPACE, *_filesystem_args(), "--chdir", "/tmp", "--"]
    drop_to = ["setpriv", f"--reuid={outside_uid}", f"--regid={outside_uid}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    return [bwrap, *_NAMESPACES, "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            *_filesystem_args(), "--", *drop_to,
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


_PROBE_LOCK = threading.Lock()  # probe once, even when many threads start sandboxes together
_WORKING_JAILS: set[tuple[str, bool]] = set()  # (bwrap, as_root) probed fine; a failure is probed again


def _probe(bwrap: str, as_root: bool) -> str | None:
    """None if the jail works on this machine, else why not. Checks that the jailed interpreter is
    ours, extension modules included (a missing bind could otherwise pick up another Python)."""
    same_python = (f"import math, os, sys\n"
                   f"assert sys.version == {sys.version!r} and os.__file__ == {os.__file__!r}")
    argv = [*_jail_argv(bwrap, _fresh_uid() if as_root else None), _python(), "-I", "-c", same_python]
    try:
        done = subprocess.run(argv, cwd="/", env=_sandbox_env("/tmp"), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{bwrap} could not be run ({e})"
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        return f"{bwrap} fails here ({lines[-1] if lines else f'exit status {done.returncode}'})"
    return None


def _jail_prefix() -> list[str] | None:
    """The jail's command prefix for one run, or None in the weaker mode the user opted in to.
    Raises the one-line error where bwrap is missing or cannot make its namespaces."""
    bwrap, as_root = shutil.which("bwrap"), os.geteuid() == 0
    if bwrap is None:
        reason = "bwrap is not installed (not on PATH)"
    elif as_root and shutil.which("setpriv") is None:
        reason = "setpriv (util-linux), which it needs as root, is not on PATH"
    else:
        with _PROBE_LOCK:
            reason = None if (bwrap, as_root) in _WORKING_JAILS else _probe(bwrap, as_root)
            if reason is None:
                _WORKING_JAILS.add((bwrap, as_root))
    if reason is None:
        return _jail_argv(bwrap, _fresh_uid() if as_root else None)
    if os.environ.get(UNSAFE_ENV) != "1":
        raise _unavailable(reason)
    warnings.warn(f"{UNSAFE_ENV}=1: running model-written code WITHOUT the bubblewrap sandbox ({reason}); only "
                  f"rlimits and an audit hook that code can get past stand in its way", RuntimeWarning, stacklevel=3)
    return None


def _read_capped(f, tail: bool) -> str:
    """At most MAX_OUTPUT_BYTES of a captured stream: the head of stdout, the tail of stderr (where
    the traceback's last line is)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - MAX_OUTPUT_BYTES) if tail else 0)
    text = f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")
    if size > MAX_OUTPUT_BYTES:
        text = f"[... {size - MAX_OUTPUT_BYTES} bytes cut ...]\n{text}" if tail else text + "\n[... cut ...]"
    return text


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 256) -> ExecutionResult:
    """Run `code` in a fresh `python -I` inside the bubblewrap jail and return what happened (never
    raises for bad code). Raises PicochatError, one line, where the jail cannot run and the user did
    not opt in to the weaker mode with PICOCHAT_UNSAFE_SANDBOX=1. The working directory is the
    jail's private /tmp, gone afterwards."""
    if not isinstance(code, str) or len(code) > MAX_CODE_CHARS:
        size = len(code) if isinstance(code, str) else type(code).__name__
        return ExecutionResult(False, "", "", error=f"code must be a string of at most {MAX_CODE_CHARS} "
                                                    f"characters, got {size}")
    jail = _jail_prefix()
    workdir = (contextlib.nullcontext("/tmp") if jail else
               tempfile.TemporaryDirectory(prefix="picochat_tool_", ignore_cleanup_errors=True))
    with workdir as home, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # RLIMIT_NPROC counts per uid: in the jail, its own; unjailed, ours (every process we have)
        max_processes = MAX_PROCESSES if jail else 0
        guards = (f"_install_guards({memory_mb * 2**20}, {math.ceil(timeout) + 1}, {max_processes}, "
                  f"{MAX_FILE_BYTES}, {MAX_OPEN_FILES})")
        script = f"{_GUARD_PRELUDE}\n{guards}\ndel _install_guards\n_run_user_code({code!r})\n"
        argv = [*(jail or []), _python(), "-I", "-u", "-c", script]
        timed_out = False
        proc = subprocess.Popen(argv, cwd="/" if jail else home, env=_sandbox_env(home),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                close_fds=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # timed out, or we are being interrupted: take the group down
                try:  # in the jail, bwrap's death kills its PID namespace, every process of the code
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
        stdout, stderr = _read_capped(out, tail=False), _read_capped(err, tail=True)
    rc = proc.returncode
    killed_by = -rc if rc < 0 else rc - 128 if jail and rc > 128 else None  # bwrap reports signal N as 128 + N
    if killed_by == signal.SIGXCPU:
        timed_out = True  # the CPU rlimit fired before the wall clock
    success = rc == 0 and not timed_out
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif not success:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1].strip() if lines else f"exited with {_exit_reason(rc, killed_by)}"
    memory_exceeded = not success and "MemoryError" in stderr
    return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded)


def _exit_reason(rc: int, killed_by: int | None) -> str:
    if killed_by is None:
        return f"status {rc}"
    try:
        return f"signal {signal.Signals(killed_by).name}"
    except ValueError:
        return f"signal {killed_by}"


# -----------------------------------------------------------------------------
# The engine's entry point

TOOL_TIMEOUT_S = 3.0
TOOL_OUTPUT_CHARS = 500


def _clip(text: str) -> str:
    return text if len(text) <= TOOL_OUTPUT_CHARS else text[:TOOL_OUTPUT_CHARS - 3] + "..."


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


def run_tool(code: str) -> str:
    """What the engine calls on <|python_start|>code<|python_end|>: the calculator if the code is
    calculator arithmetic, else the sandbox. Returns at most TOOL_OUTPUT_CHARS; never raises."""
    try:
        try:
            return _clip(format_value(_calculate(code)))
        except ArithmeticFailure as e:
            return _clip(f"Error: {e}")
        except NotArithmetic:
            pass
        if not isinstance(code, str):
            return f"Error: tool input must be a string, got {type(code).__name__}"
        result = run_python(print_last_expression(code), timeout=TOOL_TIMEOUT_S)
        if result.success:
            return _clip(result.stdout.rstrip())
        return _clip(f"Error: {result.error}")
    except Exception as e:  # never take the engine down
        return _clip(f"Error: {type(e).__name__}: {e}")
