"""
General conversation for the offline demo: chats between people and short chatbot exchanges, read
from PyPI wheels (picochat/data/sources.py has the readers, their sha256 pins and licenses).

- ChitChat: the chitchat-dataset's open-domain conversations (MIT). The first speaker becomes the
  user and the other the assistant; long conversations are cut into windows of up to MAX_TURNS
  turns, each starting with a user turn and ending with an assistant turn. Turns arrive cleaned:
  whitespace normalized, empty messages dropped, 'i' and apostrophe-less contractions fixed,
  sentences capitalized. The held-out 5% of conversations (`held_out(id)`, the same ones the demo
  pretraining corpus keeps for validation) form the test split.
- Chatterbot: the chatterbot-corpus's ~2,000 English exchanges (greetings, small talk, trivia,
  tech support; BSD), as user/assistant pairs. Train only: the everyday evaluation writes its own
  prompts (picochat/tasks/everyday.py).

    ChitChat(split="train", stop=3000); ChitChat(split="test"); Chatterbot()
"""
from __future__ import annotations

from picochat.common import PicochatError
from picochat.data.sources import chatterbot_conversations, chitchat_conversations, held_out
from picochat.tasks.base import Task

MAX_TURNS = 6          # 3 exchanges: a window stays well inside a 512-token row
MAX_TURN_CHARS = 600   # a longer turn (rare: a paste) is left out with its window


def as_messages(turns: list[str] | tuple[str, ...]) -> list[dict]:
    """Alternating user/assistant messages, ending on the assistant (a trailing user turn is dropped)."""
    turns = list(turns[:len(turns) - len(turns) % 2])
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


class ChitChat(Task):

    def __init__(self, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise PicochatError(f"ChitChat has splits train and test, got {split!r}")
        self.split, self.source, self.skipped = split, "offline", 0
        self.windows = []  # (conversation id, turns of one window)
        for cid, turns in chitchat_conversations():
            if held_out(cid) != (split == "test"):
                continue
            for start in range(0, len(turns) - 1, MAX_TURNS):
                window = turns[start:start + MAX_TURNS]
                if len(window) < 2:
                    continue
                if any(len(t) > MAX_TURN_CHARS for t in window):
                    self.skipped += 1
                    continue
                self.windows.append((cid, window))

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.windows)

    def get_example(self, index: int) -> dict:
        cid, window = self.windows[index]
        return {"messages": as_messages(window), "id": cid}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError("chitchat has no right answer; evaluate it by bits per byte")


class Chatterbot(Task):

    def __init__(self, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split != "train":
            raise PicochatError(f"Chatterbot has only a train split, got {split!r}")
        self.split, self.source = split, "offline"
        convs = chatterbot_conversations()
        self.convs = [(name, turns) for name, turns in convs if len(turns) >= 2]
        self.skipped = len(convs) - len(self.convs)

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.convs)

    def get_example(self, index: int) -> dict:
        name, turns = self.convs[index]
        return {"messages": as_messages(turns), "id": name}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError("Chatterbot exchanges are training data; there is no right answer")
