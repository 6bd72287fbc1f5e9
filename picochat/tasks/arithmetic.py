"""
Arithmetic: small synthetic +, -, * and / problems solved with the calculator tool, for the offline
demo mixture (where GSM8K train is not available). The user asks in one of several phrasings, with
the operators as symbols ('12*7', '12 * 7') or, as people ask, in words ('12 times 7', '84 divided
by 7'); the assistant calls the tool with the expression in symbols (a `python` part), gets the
result (a `python_output` part, what the calculator answers) and ends with '#### n', like GSM8K.
Generative: `evaluate` compares the '#### n' number.

Problems have two or three operands (0-99 for + and -, 2-20 for *), or are one division whose
quotient is whole (2-20 times 2-20, divided by the one). Train and test are disjoint: a problem's
split is fixed by a hash of its expression (10% test), and each split only keeps its own; the
phrasings are the same in both. Example i comes from an RNG seeded with (split, i), so the task is
the same on every run.

    Arithmetic(size=2000)                       # train
    Arithmetic(size=200, split="test")
"""
from __future__ import annotations

import hashlib
import random

from picochat.common import PicochatError
from picochat.tasks.base import Task
from picochat.tasks.gsm8k import answers_match, extract_answer, reference_answer

TEST_PERCENT = 10
QUESTIONS = [
    "What is {expr}?", "Compute {expr}.", "Calculate {expr}", "What's {expr}?", "{expr} = ?",
    "Please work out {expr}.", "Can you tell me what {expr} is?", "Solve: {expr}",
    "how much is {expr}", "Evaluate {expr} for me.", "How much is {expr}?", "what's {expr}",
    "Quick question: what is {expr}?", "Do you know what {expr} makes?",
]
# The operators as people say them ('What is 12 times 7?'); the tool call keeps the symbols.
SPOKEN = {"+": ["plus"], "-": ["minus"], "*": ["times", "multiplied by"], "/": ["divided by"]}
SPOKEN_SHARE, COMPACT_SHARE = 0.4, 0.3  # of questions: '12 times 7', '12*7'; the rest '12 * 7'
OPENERS = ["Let me compute that with the calculator.\n\n", "I'll use the calculator for this.\n\n",
           "Let me calculate it.\n\n", "Using Python to be exact:\n\n", ""]


def problem_split(expr: str) -> str:
    """'test' for a fixed 10% of expressions (by a hash, the same everywhere), else 'train'."""
    bucket = int.from_bytes(hashlib.blake2b(expr.encode(), digest_size=8).digest(), "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def spoken(expr: str, rng: random.Random) -> str:
    """'12 * 7 + 3' -> '12 times 7 plus 3'."""
    return " ".join(rng.choice(SPOKEN[term]) if term in SPOKEN else term for term in expr.split(" "))


def random_expression(rng: random.Random) -> str:
    if rng.random() < 0.15:  # one division, whole: how people ask about sharing things out
        divisor, quotient = rng.randint(2, 20), rng.randint(2, 20)
        return f"{divisor * quotient} / {divisor}"

    def operand(op):
        return rng.randint(2, 20) if op == "*" else rng.randint(0, 99)
    ops = [rng.choice("+-*") for _ in range(rng.choice([1, 1, 2]))]
    terms = [str(operand(ops[0]))]
    for op in ops:
        terms += [op, str(operand(op))]
    return " ".join(terms)


class Arithmetic(Task):

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise PicochatError(f"Arithmetic has splits train and test, got {split!r}")
        self.size, self.split = size, split
        self.source, self.skipped = "generated", 0

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"Arithmetic/{self.split}/{index}")
        expr = random_expression(rng)
        while problem_split(expr) != self.split:  # rejection keeps the splits disjoint
            expr = random_expression(rng)
        # digits, spaces and + - * / only, made above; // is / here (every quotient is whole) and
        # gives the int the calculator prints ('12', not '12.0')
        result = eval(expr.replace("/", "//"), {"__builtins__": {}}, {})
        form = rng.random()
        shown = (spoken(expr, rng) if form < SPOKEN_SHARE else
                 expr.replace(" ", "") if form < SPOKEN_SHARE + COMPACT_SHARE else expr)
        question = rng.choice(QUESTIONS).format(expr=shown)
        opener = rng.choice(OPENERS)
        parts = [{"type": "text", "text": opener}] if opener else []
        parts += [{"type": "python", "text": expr},
                  {"type": "python_output", "text": str(result)},
                  {"type": "text", "text": f"\n\n{expr} = {result}\n#### {result}"}]
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(extract_answer(completion), reference_answer(conversation))
