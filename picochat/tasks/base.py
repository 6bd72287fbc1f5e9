"""
The Task interface every dataset and benchmark implements, and TaskMixture, which combines them.

A task is a list of *conversations*:

    {"messages": [
        {"role": "system", "content": "optional; merged into the first user turn when rendered"},
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": [                     # a string, or a list of parts:
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*7"},                # a tool call (supervised)
            {"type": "python_output", "text": "84"},           # the tool's answer (not supervised)
            {"type": "text", "text": "The answer is 84.\\n#### 84"},
        ]},
    ]}

Categorical tasks (multiple choice) also carry "letters": ["A", "B", "C", "D"] and the assistant's
content is the gold letter. A task is sliced logically (start/stop/step) without copying data.

    task = GSM8K(split="train", start=0, stop=100)
    len(task); task[3]; task.evaluate(task[3], "... #### 42")
"""
from __future__ import annotations

import random


class Task:
    """Base class: subclasses implement num_examples(), get_example(i), eval_type, evaluate()."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    # --- to implement ---------------------------------------------------------------------
    @property
    def eval_type(self) -> str:
        """'categorical' (pick a letter) or 'generative' (free text, checked by evaluate)."""
        raise NotImplementedError

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward; by default 1.0 for a correct completion, else 0.0."""
        return float(self.evaluate(conversation, completion))

    # --- slicing --------------------------------------------------------------------------
    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        return self.get_example(self.start + i * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class TaskMixture(Task):
    """All examples of several tasks in one deterministic shuffled order (seed 42). A task listed
    twice is seen twice per epoch: that is how oversampling is expressed."""

    def __init__(self, tasks: list[Task], seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    @property
    def eval_type(self) -> str:
        kinds = {t.eval_type for t in self.tasks}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """The multiple-choice prompt (docs/DESIGN.md#tasks): each choice is followed by '=<letter>' with no space,
    so the letter the model must emit is tokenized exactly as it appears in the prompt."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "\n".join(lines)
