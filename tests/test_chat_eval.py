"""Chat evaluation: categorical accuracy is exactly what the model's letter logits imply, and a
letter outside the allowed set is never predicted; the chance baseline of '#### n' tasks."""
from types import SimpleNamespace

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
    """Logits that always prefer D, then C, then A, then B; it records the inputs it was given."""
    def __init__(self, context=64):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, 1)
        self.config = SimpleNamespace(sequence_len=context)
        self.inputs = []

    def trunk(self, ids):
        self.inputs.append(ids)
        return torch.zeros(ids.size(0), ids.size(1), 1)

    def logits(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], 20)
        logits[..., 13], logits[..., 12], logits[..., 10], logits[..., 11] = 9.0, 5.0, 3.0, 1.0
        return logits


def test_categorical_accuracy_follows_the_logits_within_the_allowed_letters():
    task = Letters()
    # D is never allowed, so the model answers C on 3-choice questions and A on 2-choice ones.
    expected = sum((("C" if len(c["letters"]) == 3 else "A") == c["messages"][-1]["content"]) for c in task)
    acc = run_categorical(FavoursLetter(), StubTokenizer(), task, batch_size=5)
    assert acc == expected / len(task)
    assert 0 < acc < 1


def test_a_prompt_longer_than_the_context_keeps_its_bos_and_its_end():
    class LongPrompts(StubTokenizer):
        def render_for_completion(self, conv):
            return [0] + list(range(100, 140))  # BOS and 40 tokens

    model = FavoursLetter(context=8)
    run_categorical(model, LongPrompts(), Letters(), batch_size=5)
    assert model.inputs[0][0].tolist() == [0, 133, 134, 135, 136, 137, 138, 139]


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


def test_batched_generative_eval_gives_each_problem_the_completion_it_gets_alone():
    """Continuous batching across problems (16 rows) must not change what any problem's greedy
    completion is: the grader sees the same text as with one problem at a time."""
    from picochat.evals.chat_eval import run_generative
    from picochat.model import GPT, GPTConfig
    from picochat.tokenizer import train_tokenizer

    tok = train_tokenizer(["How many letters are in the word apple? It is 5. " * 50], 300)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2,
                          n_kv_head=1, n_embd=32))
    model.init_weights(seed=0)
    with torch.no_grad():  # zero-initialized projections: perturb so every problem differs
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))

    class Words(Task):
        eval_type = "generative"

        def __init__(self):
            super().__init__()
            self.seen = {}

        def num_examples(self):
            return 12

        def get_example(self, i):
            word = "apple pear fig kiwi plum lime date grape melon peach lemon mango".split()[i]
            return {"messages": [{"role": "user", "content": f"How many letters are in {word}?"},
                                 {"role": "assistant", "content": "#### 5"}], "i": i}

        def evaluate(self, conv, completion):
            self.seen[conv["i"]] = completion
            return "e" in completion

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone, batched = Words(), Words()
        acc_alone = run_generative(model.eval(), tok, alone, max_new_tokens=12, batch_size=1, tool=str)
        acc_batched = run_generative(model, tok, batched, max_new_tokens=12, batch_size=16, tool=str)
    finally:
        torch.set_num_threads(threads)
    assert sorted(alone.seen) == list(range(12))
    assert batched.seen == alone.seen and acc_batched == acc_alone
    assert len(set(alone.seen.values())) > 1  # the problems' completions differ: a real comparison
