"""Chat evaluation: categorical accuracy is exactly what the model's letter logits imply, and a
letter outside the allowed set is never predicted; the chance baseline of '#### n' tasks."""
import torch

from picochat.evals.chat_eval import chatcore, constant_answer_baseline, run_categorical
from picochat.tasks.base import Task


class Letters(Task):
    """Question i's gold letter cycles A, B, C; two-choice questions allow only A and B."""
    eval_type = "categorical"

    def num_examples(self):
        return 12

    def get_example(self, i):
        letters = ["A", "B"] if i % 4 == 3 else ["A", "B", "C"]
        gold = letters[i % len(letters)]
        return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": gold}],
                "letters": letters}

    def evaluate(self, conv, completion):
        return completion == conv["messages"][-1]["content"]


class StubTokenizer:
    bos_id = 0
    ids = {"A": 10, "B": 11, "C": 12, "D": 13}

    def encode(self, text):
        return [self.ids[text]]

    def render_for_completion(self, conv):
        return [0, 1, 2]


class FavoursLetter(torch.nn.Module):
    """Logits that always prefer D, then C, then A, then B."""
    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, 1)

    def forward(self, ids):
        logits = torch.zeros(ids.size(0), ids.size(1), 20)
        logits[..., 13], logits[..., 12], logits[..., 10], logits[..., 11] = 9.0, 5.0, 3.0, 1.0
        return logits


def test_categorical_accuracy_follows_the_logits_within_the_allowed_letters():
    task = Letters()
    # D is never allowed, so the model answers C on 3-choice questions and A on 2-choice ones.
    expected = sum((("C" if len(c["letters"]) == 3 else "A") == c["messages"][-1]["content"]) for c in task)
    acc = run_categorical(FavoursLetter(), StubTokenizer(), task, batch_size=5)
    assert acc == expected / len(task)
    assert 0 < acc < 1


def test_chance_is_the_best_constant_answer():
    class Counts(Task):
        eval_type = "generative"

        def num_examples(self):
            return 10

        def get_example(self, i):
            return {"answer": 1 if i < 6 else 2}

        def evaluate(self, conv, completion):
            return completion.strip() == f"#### {conv['answer']}"

    assert constant_answer_baseline(Counts()) == 0.6


def test_chatcore_needs_every_task_and_centers_multiple_choice():
    assert chatcore({"ARC-Easy": 0.5}) is None
    full = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
            "SpellingBee": 0.0}
    assert chatcore(full) == 0.0
    assert abs(chatcore(dict(full, SpellingBee=0.6)) - 0.1) < 1e-12
