"""
The tools a chat model can call: a calculator and a Python sandbox.

The engine sees `<|python_start|>code<|python_end|>` in a sample, calls `run_tool(code)` and forces
`<|output_start|>` + result + `<|output_end|>` into the sequence (spec §8.3). HumanEval-style evals call
`run_python` directly (spec §8.4).

- `use_calculator(expr)`: arithmetic and a few string methods (`'strawberry'.count('r')`), evaluated
  by walking the AST of an allow-list. Nothing is ever passed to eval/exec, so there is no escape to
  block and no subprocess to pay for; sizes and exponents are capped, and a deadline stops the walk.
  Always returns a string; failures start with "Error: ".
- `run_python(code)`: a fresh `python -I` subprocess in a temporary directory, with a scrubbed
  environment, stdin at /dev/null and a wall-clock timeout that kills its whole process group.
  Layers, outermost first, each applied only where the OS allows it (probed once, silent fallback):
    1. a new network namespace (`unshare -n`): no network at all, whatever the code does;
    2. when we are root: a private throwaway uid via `setpriv` with no new privileges, so the kernel
       refuses writes to system files, signals to other processes and more than 16 processes or
       threads; everything left running under that uid is killed afterwards;
    3. rlimits set by a prelude before the user code: address space, CPU seconds, file size (stdout
       and stderr are files too, so output is bounded), open files, processes, no core dumps;
    4. a Python audit hook (it fires inside the C functions, so re-imported modules and subclass
       walks meet it too, and it cannot be removed) that refuses process creation, kill, ctypes,
       sockets, resource limits, chdir, writes outside the working directory and reading other
       processes' /proc files, and blocks importing subprocess/socket/ctypes/multiprocessing/...;
       the few functions that raise no audit event (os.open with dir_fd, mknod, pidfd_open) are
       replaced.
  This is defence in depth, NOT a security boundary. Known gaps: code that loads a C extension by
  hand, corrupts interpreter memory or monkeypatches what the hook calls (builtins, os.path) gets
  past the Python layers, and then only the OS layers remain; those still let the private uid
  write world-writable places (/tmp, /dev/shm) and fill the disk with many 8 MiB files until the
  timeout; where the interpreter lives under a private home (pyenv in /root) the sandbox keeps
  CAP_DAC_READ_SEARCH and can read what root reads; without root or `unshare` the Python layers
  are all there is. Do not run untrusted users' code next to secrets.
  sys.exit() counts as a failure: the code did not run to its end.
- `run_tool(code)`: calculator first; if the text is not calculator arithmetic, the sandbox (3 s),
  printing the value of a final expression like a notebook cell. Short string, never raises.

Run the tests:  python -m pytest tests/test_tools.py
Try it:         python -c "from picochat.tools import run_tool; print(run_tool('2**10 / 4'))"
"""
from __future__ import annotations

import ast
import functools
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
# Python sandbox: a fresh interpreter behind OS limits and an audit hook

MAX_CODE_CHARS = 100_000  # the code travels on the command line (Linux allows 128 KiB per argument)
MAX_OUTPUT_BYTES = 10_000  # per stream, kept in the result
MAX_FILE_BYTES = 8 * 2**20  # RLIMIT_FSIZE: any file, stdout and stderr included (they are files)
MAX_OPEN_FILES = 64
MAX_PROCESSES = 16  # RLIMIT_NPROC, threads included; only enforced for the private uid (root ignores it)
SANDBOX_PATH = "/usr/bin:/bin"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# Runs inside the child before the user code. Its helpers live in closures, not in globals, and the
# audit hook cannot be removed once added (Python has no API for it).
_GUARD_PRELUDE = r'''
import sys

def _install_guards(memory_bytes, cpu_seconds, max_processes, max_file_bytes, max_open_files, write_flags):
    import os, posix, resource, signal

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

    root = os.path.realpath(os.getcwd())
    realpath, fspath, fsdecode, my_pid = os.path.realpath, os.fspath, os.fsdecode, str(os.getpid())
    path_types = (str, bytes, os.PathLike)

    def refuse(what):
        raise PermissionError(f"{what} is disabled in the picochat sandbox")

    def check_path(path, writing, what):
        if not isinstance(path, path_types):
            return  # an already-open file descriptor
        real = realpath(fsdecode(fspath(path)))
        parts = real.split("/")
        if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != my_pid:
            refuse(f"{what} of another process's /proc files")
        if writing and real != root and not real.startswith(root + "/"):
            refuse(f"{what} outside the working directory ({real})")

    forbidden = {"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                 "os.kill", "os.killpg", "os.chdir", "os.chown", "os.chflags", "os.lchflags",
                 "shutil.rmtree", "shutil.chown", "resource.setrlimit", "resource.prlimit"}
    forbidden_prefixes = ("subprocess.", "socket.", "ctypes.", "_posixsubprocess.")
    blocked_modules = {"subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing",
                       "socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "pty", "resource",
                       "posix", "_io"}  # posix/_io: no fresh, unguarded copies after a sys.modules purge
    # event -> (positions of path arguments, positions of dir_fd arguments; -1 means none)
    writes = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
              "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((0, 1), (2,)),
              "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.utime": ((0,), (3,))}

    def audit(event, args):
        if event in forbidden or event.startswith(forbidden_prefixes):
            refuse(event)
        if event == "import" and args[0].partition(".")[0] in blocked_modules:
            raise ImportError(f"import {args[0]} is disabled in the picochat sandbox", name=args[0])
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                      (isinstance(flags, int) and flags > 0 and bool(flags & write_flags))
            check_path(path, writing, "open()")
        elif event in writes:
            paths, dir_fds = writes[event]
            if any(isinstance(args[i], int) and args[i] >= 0 for i in dir_fds):
                refuse(f"{event} with dir_fd")
            for i in paths:
                check_path(args[i], True, event)

    for name in list(sys.modules):  # anything the prelude pulled in must be imported afresh (and refused)
        if name.partition(".")[0] in blocked_modules - {"posix", "_io"}:
            del sys.modules[name]
    sys.addaudithook(audit)

    # A few functions raise no audit event; replace them. os.open's event does not show dir_fd,
    # which could point the write check at the wrong directory.
    real_open = os.open
    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            refuse("os.open() with dir_fd")
        return real_open(path, flags, mode)
    for module in (os, posix):
        module.open = os_open
        for name in ("mknod", "mkfifo", "chroot", "pidfd_open", "setns", "unshare"):
            if hasattr(module, name):
                setattr(module, name, lambda *a, _name=name, **k: refuse(f"os.{_name}()"))
    signal.pidfd_send_signal = lambda *a, **k: refuse("signal.pidfd_send_signal()")

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


def _privilege_drop_args(uid: int, read_all: bool) -> list[str]:
    """setpriv arguments: become `uid`, no supplementary groups, no way back (no_new_privs, so setuid
    binaries do not help). `read_all` keeps only CAP_DAC_READ_SEARCH, for interpreters installed
    under a private home (pyenv in /root): the sandbox can then read what root reads, but not write."""
    caps = "-all,+dac_read_search" if read_all else "-all"
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps={caps}",
            f"--ambient-caps={caps}", f"--bounding-set={caps}", "--no-new-privs"]


_ISOLATION_LOCK = threading.Lock()  # probe once, even when many threads start sandboxes together


@functools.cache
def _os_isolation() -> tuple[tuple[str, ...], bool | None]:
    """Probed once: the command prefix that gives a fresh network namespace (empty if none works),
    and whether we can drop to a private uid (None: no; False: plainly; True: needs read_all)."""
    def works(argv):
        try:
            return subprocess.run(argv, cwd="/", env={"PATH": SANDBOX_PATH}, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False
    # The same interpreter and stdlib as ours, extension modules included (a uid that cannot read
    # the install may silently end up with another Python's stdlib).
    same_python = (f"import math, os, sys\n"
                   f"assert sys.version == {sys.version!r} and os.__file__ == {os.__file__!r}")
    python = [sys.executable, "-I", "-c", same_python]
    netns = next((p for p in (("unshare", "-n"), ("unshare", "-r", "-n"))
                  if shutil.which(p[0]) and works([*p, *python])), ())
    drop = None
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv"):
        drop = next((read_all for read_all in (False, True)
                     if works([*netns, *_privilege_drop_args(_fresh_uid(), read_all), *python])), None)
    return netns, drop


SANDBOX_UIDS = range(1_000_000, 1_000_000 + 2**24)  # above any account's uid


def _fresh_uid() -> int:
    """A throwaway uid no account uses, so RLIMIT_NPROC counts only this run and cleanup can kill
    everything it owns."""
    return SANDBOX_UIDS.start + int.from_bytes(os.urandom(3), "little")


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


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process owned by `uid` (a fork bomb's orphans escape the process group)."""
    for _ in range(5):
        live = live_processes_of(range(uid, uid + 1))
        if not live:
            return
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


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
    """Run `code` in a fresh, locked-down `python -I` and return what happened (never raises for bad
    code). Defence in depth, not a perfect security boundary: see the module docstring for the layers
    and their limits. The working directory is a new temporary directory, deleted afterwards."""
    if not isinstance(code, str) or len(code) > MAX_CODE_CHARS:
        size = len(code) if isinstance(code, str) else type(code).__name__
        return ExecutionResult(False, "", "", error=f"code must be a string of at most {MAX_CODE_CHARS} "
                                                    f"characters, got {size}")
    with _ISOLATION_LOCK:
        netns, drop = _os_isolation()
    uid = _fresh_uid() if drop is not None else None
    with tempfile.TemporaryDirectory(prefix="picochat_tool_", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        argv = list(netns)
        if uid is not None:
            os.chown(workdir, uid, uid)
            argv += _privilege_drop_args(uid, read_all=drop)
        max_processes = MAX_PROCESSES if uid is not None else 0  # as our own uid it would count our processes
        guards = (f"_install_guards({memory_mb * 2**20}, {math.ceil(timeout) + 1}, {max_processes}, "
                  f"{MAX_FILE_BYTES}, {MAX_OPEN_FILES}, {_WRITE_FLAGS})")
        script = f"{_GUARD_PRELUDE}\n{guards}\ndel _install_guards\n_run_user_code({code!r})\n"
        argv += [sys.executable, "-I", "-u", "-c", script]
        env = {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
               # one BLAS thread: numpy's per-core thread pools would not fit RLIMIT_NPROC/RLIMIT_AS
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        timed_out = False
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True, close_fds=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # timed out, or we are being interrupted: take the group down
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
            if uid is not None:
                _kill_uid(uid)
        stdout, stderr = _read_capped(out, tail=False), _read_capped(err, tail=True)
    rc = proc.returncode
    if rc == -signal.SIGXCPU:
        timed_out = True  # the CPU rlimit fired before the wall clock
    success = rc == 0 and not timed_out
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif not success:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1].strip() if lines else f"exited with {_exit_reason(rc)}"
    memory_exceeded = not success and "MemoryError" in stderr
    return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded)


def _exit_reason(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


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
