"""
Your own conversations: a JSONL file, one conversation per line, either {"messages": [...]} or a
bare list of messages, in the format of tasks/base.py. Malformed lines are skipped and counted.

    picochat sft --mixture my_chats.jsonl      # trains on the file (the last 5% held out for val)
"""
from __future__ import annotations

from pathlib import Path

from picochat.common import PicochatError, read_jsonl
from picochat.tasks.base import Task


def valid_messages(messages) -> bool:
    if not isinstance(messages, list) or not messages:
        return False
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return False
        if not isinstance(m.get("content"), (str, list)):
            return False
    return True


def conversation(row) -> dict:
    """One line's conversation; ValueError when it is not one (the line is then skipped)."""
    messages = row.get("messages") if isinstance(row, dict) else row
    if not valid_messages(messages):
        raise ValueError("not a list of messages with roles system/user/assistant and content")
    return {"messages": messages}


class CustomJSON(Task):
    def __init__(self, path: str | Path, **kwargs):
        super().__init__(**kwargs)
        path = Path(path)
        if not path.is_file():
            raise PicochatError(f"conversation file {path} does not exist")
        bad = []
        self.conversations = read_jsonl(path, conversation, on_bad_line=lambda lineno, e: bad.append(lineno))
        self.skipped = len(bad)
        if not self.conversations:
            raise PicochatError(f"{path} holds no valid conversations ({self.skipped} malformed lines)")

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError("custom conversations have no automatic grader")


def file_mixture(path: str):
    """(train, val) from one file: the last 5% (at least one conversation) held out."""
    full = CustomJSON(path)
    n_val = max(1, len(full) // 20) if len(full) > 1 else 0
    train = CustomJSON(path, stop=len(full) - n_val)
    val = CustomJSON(path, start=len(full) - n_val) if n_val else train
    return train, val
