"""
Tests for picochat/toolbox.py: the one dispatcher answers what it answered before tools had names
(arithmetic from the calculator, other code from the python tool), runs a tool called by name,
bounds every answer in length and time, and takes a tool a user adds. The python tool is replaced
by a stand-in here; the real sandbox behind run_tool is tests/test_tools.py's.
Run:  python -m pytest tests/test_toolbox.py  (well under a second)
"""
import threading
import time

import pytest

import picochat.toolbox as toolbox
from picochat.toolbox import TOOL_OUTPUT_CHARS, TOOLS, Tool, add_tool, run_tool


@pytest.fixture
def registry(monkeypatch):
    """A copy of the tools, its python tool a stand-in that says what it was given."""
    tools = dict(TOOLS)
    tools["python"] = Tool("python", "a stand-in for the sandbox", lambda code: f"python ran {code!r}")
    monkeypatch.setattr(toolbox, "TOOLS", tools)
    return tools


def test_the_three_tools_are_there_each_with_one_line():
    assert {"calculator", "python", "search"} <= set(TOOLS)
    for tool in TOOLS.values():
        assert tool.description.strip() and "\n" not in tool.description and tool.timeout_s > 0


def test_arithmetic_is_still_the_calculators_and_other_code_still_pythons(registry):
    assert run_tool("2**10 / 4") == "256"
    assert run_tool("1,234 + 5") == "1239"
    assert run_tool("'strawberry'.count('r')") == "3"
    assert run_tool("1/0") == "Error: division by zero"  # a calculator failure never falls back to Python
    assert run_tool("x = 6\nx * 7") == "python ran 'x = 6\\nx * 7'"
    assert run_tool("print('hi')") == "python ran \"print('hi')\""
    assert run_tool(None) == "Error: tool input must be a string, got NoneType"


def test_a_block_that_is_one_call_by_name_runs_that_tool(registry):
    assert run_tool('calculator("12 * 7")') == "84"
    assert run_tool("  calculator('2 + 2')\n") == "4"
    # python is the block itself, never a name: python("...") is code like any other
    assert run_tool('python("1 + 1")') == "python ran 'python(\"1 + 1\")'"
    # a call inside more code is code
    assert run_tool('x = calculator("1")') == "python ran 'x = calculator(\"1\")'"
    assert run_tool('print(calculator("1"))') == "python ran 'print(calculator(\"1\"))'"


@pytest.mark.parametrize("code", ['search(volcano)', 'search("a", "b")', 'search(query="a")', 'search()',
                                  'search(f"{1}")', 'search(1)', 'search("a" + "b")'])
def test_a_tool_called_the_wrong_way_says_how_to_call_it(code, registry):
    assert run_tool(code) == 'Error: search takes one string in quotes, e.g. search("...")'


def test_a_tool_added_in_a_few_lines_is_callable(registry):
    add_tool(Tool("shout", "the text in capitals", str.upper))
    assert run_tool('shout("volcano")') == "VOLCANO"
    with pytest.raises(ValueError, match="already a tool named 'shout'"):
        add_tool(Tool("shout", "again", str.lower))


@pytest.mark.parametrize("name, description, match", [
    ("len", "shadows a builtin", "not a keyword or a builtin"), ("class", "a keyword", "not a keyword"),
    ("two words", "not a name", "Python name"), ("fine", "two\nlines", "one line"), ("fine", "", "one line"),
])
def test_a_tool_with_a_bad_name_or_description_is_refused(name, description, match):
    with pytest.raises(ValueError, match=match):
        Tool(name, description, str.upper)


def test_every_answer_is_cut_to_the_output_bound(registry):
    add_tool(Tool("flood", "a long answer", lambda text: text * 10_000))
    answer = run_tool('flood("ab")')
    assert len(answer) == TOOL_OUTPUT_CHARS and answer.endswith("...")


def test_a_tool_that_does_not_answer_in_time_is_an_error_and_the_call_returns(registry):
    release = threading.Event()
    add_tool(Tool("stuck", "never answers in time", lambda text: release.wait(10) and "late", timeout_s=0.2))
    start = time.monotonic()
    try:
        assert run_tool('stuck("x")') == "Error: stuck gave no answer within 0.2 s"
        assert time.monotonic() - start < 2
    finally:
        release.set()


def test_a_tool_that_raises_answers_with_an_error(registry):
    add_tool(Tool("broken", "raises", lambda text: 1 / 0))
    assert run_tool('broken("x")') == "Error: ZeroDivisionError: division by zero"


def test_without_the_python_tool_only_arithmetic_and_named_tools_answer(registry):
    del registry["python"]
    assert run_tool("6 * 7") == "42" and run_tool('calculator("6 * 7")') == "42"
    assert run_tool("import os").startswith("Error: the python tool is switched off")
