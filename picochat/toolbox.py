"""
The tools a chat model can call, by name, and `run_tool`, the one dispatcher the engine calls
(docs/TOOLS.md).

A tool is a name, a one-line description and a function from a string to a short string, kept in
TOOLS. The model calls one inside the python block it already has, so the vocabulary, exported
models and imported nanochat checkpoints stay as they are:

    <|python_start|>search("volcano")<|python_end|>  -> the search tool: "Volcano: A volcano is ..."
    <|python_start|>12 * 7<|python_end|>             -> the calculator, in-process: "84"
    <|python_start|>sorted([3, 1, 2])<|python_end|>  -> the python tool, in the sandbox: "[1, 2, 3]"

`run_tool(code)` reads the block: when the whole of it is `name("argument")` for a tool other than
python, that tool answers the argument; otherwise calculator arithmetic goes to the calculator and
any other code to the python tool, exactly as before tools had names. Every answer is a string of
at most TOOL_OUTPUT_CHARS characters that comes within the tool's `timeout_s`; run_tool never
raises. Adding a tool:

    from picochat.toolbox import Tool, add_tool, run_tool
    add_tool(Tool("shout", "the text in capitals", str.upper))
    run_tool('shout("hi")')  # 'HI'
"""
from __future__ import annotations

import ast
import builtins
import keyword
import re
import threading
from dataclasses import dataclass
from typing import Callable

from picochat.common import PicochatError
from picochat.search import default_index, format_hits, index_path, search
from picochat.tools import (TOOL_OUTPUT_CHARS, TOOL_TIMEOUT_S, ArithmeticFailure, NotArithmetic, calculate,
                            format_value, python_tool, use_calculator)

SEARCH_RESULTS = 3  # pages per search answer: about 160 characters each within TOOL_OUTPUT_CHARS
CALL_START = re.compile(r"\s*([A-Za-z_]\w*)\s*\(")  # `name(`: only such a block is parsed as a call


@dataclass(frozen=True)
class Tool:
    """What the model calls as name("argument"). `run` answers with a short string (or "Error: ...");
    the dispatcher cuts it to TOOL_OUTPUT_CHARS and answers with an error after `timeout_s`."""
    name: str
    description: str  # one line, for people and for prompts that list the tools
    run: Callable[[str], str]
    timeout_s: float = 2.0

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name.isidentifier()) or keyword.iskeyword(self.name) \
                or hasattr(builtins, self.name):
            raise ValueError(f"a tool's name must be a Python name that is not a keyword or a builtin "
                             f"(the model writes name(\"...\")), got {self.name!r}")
        if not isinstance(self.description, str) or not self.description.strip() or "\n" in self.description:
            raise ValueError(f"tool {self.name}: the description must be one line of text, got {self.description!r}")
        if not callable(self.run):
            raise ValueError(f"tool {self.name}: run must be a function from a string to a string, got {self.run!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"tool {self.name}: timeout_s must be positive, got {self.timeout_s!r}")


TOOLS: dict[str, Tool] = {}


def add_tool(tool: Tool) -> Tool:
    """Make `tool` callable as name("argument") from every engine, chat, server and RL run in this
    process. `del TOOLS[name]` takes one away (without "python", code that is not arithmetic is refused)."""
    if tool.name in TOOLS:
        raise ValueError(f"there is already a tool named {tool.name!r}; `del TOOLS[{tool.name!r}]` first to replace it")
    TOOLS[tool.name] = tool
    return tool


def search_tool(query: str) -> str:
    """The search tool: the top pages of the index named by $PICOCHAT_SEARCH_INDEX (default: the
    demo's Wikipedia summaries), one line each."""
    try:
        return format_hits(search(index_path(default_index()), query, k=SEARCH_RESULTS), TOOL_OUTPUT_CHARS)
    except PicochatError as e:  # no index, a broken one, a query past its time: one line the model reads
        return f"Error: {e}"


add_tool(Tool("calculator", "arithmetic and string counting, e.g. calculator(\"12 * 7\")", use_calculator))
# The sandbox stops the code itself at TOOL_TIMEOUT_S; 2 s more for starting and tearing down the
# jail on a busy machine (tests/test_sandbox.py allows the same).
add_tool(Tool("python", "runs the block as Python in a sandbox and prints the value of its last line",
              python_tool, timeout_s=TOOL_TIMEOUT_S + 2.0))
add_tool(Tool("search", "the top pages of the local encyclopedia for some words, e.g. search(\"volcano\")",
              search_tool))


# -----------------------------------------------------------------------------
# The dispatcher

def _clip(text: str) -> str:
    return text if len(text) <= TOOL_OUTPUT_CHARS else text[:TOOL_OUTPUT_CHARS - 3] + "..."


def call_tool(tool: Tool, argument: str) -> str:
    """`tool.run(argument)` in a thread of its own, waited for up to `tool.timeout_s`: its answer
    cut to TOOL_OUTPUT_CHARS, or "Error: ..." when it raised or did not answer in time. A tool that
    never returns is left running in its (daemon) thread; the built-in ones all stop themselves."""
    answer = []

    def work():
        try:
            answer.append(str(tool.run(argument)))
        except Exception as e:  # a buggy tool must not end the generation
            answer.append(f"Error: {type(e).__name__}: {e}")

    worker = threading.Thread(target=work, name=f"tool {tool.name}", daemon=True)
    worker.start()
    worker.join(tool.timeout_s)
    if not answer:
        return f"Error: {tool.name} gave no answer within {tool.timeout_s:g} s"
    return _clip(answer[0])


def named_call(code: str) -> tuple[Tool, str | None] | None:
    """(tool, argument) when the whole block is `name("argument")` for a tool other than python;
    (tool, None) when it calls such a tool some other way; None when it calls no tool by name."""
    start = CALL_START.match(code)
    tool = TOOLS.get(start.group(1)) if start else None
    if tool is None or tool.name == "python":
        return None
    try:
        call = ast.parse(code.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):  # e.g. search("a").upper()
        return None
    argument = call.args[0] if len(call.args) == 1 and not call.keywords else None
    if isinstance(argument, ast.Constant) and type(argument.value) is str:
        return tool, argument.value
    return tool, None


def run_tool(code: str) -> str:
    """What the engine calls on <|python_start|>code<|python_end|>: a tool called by name, else the
    calculator for arithmetic, else the python tool. At most TOOL_OUTPUT_CHARS; never raises."""
    if not isinstance(code, str):
        return f"Error: tool input must be a string, got {type(code).__name__}"
    named = named_call(code)
    if named is not None:
        tool, argument = named
        if argument is None:
            return f"Error: {tool.name} takes one string in quotes, e.g. {tool.name}(\"...\")"
        return call_tool(tool, argument)
    try:
        return _clip(format_value(calculate(code)))
    except ArithmeticFailure as e:
        return _clip(f"Error: {e}")
    except NotArithmetic:
        pass
    except Exception as e:  # a calculator bug must not end the generation
        return _clip(f"Error: {type(e).__name__}: {e}")
    if "python" not in TOOLS:
        return "Error: the python tool is switched off here; only arithmetic and tools called by name answer"
    return call_tool(TOOLS["python"], code)
