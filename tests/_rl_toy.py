"""
`picochat rl` with a toy task a tiny, barely trained model can improve on within a few steps:
the reward is the share of the letter 'e' among the letters of the reply (0 without letters).
tests/test_rl.py runs it as a process (so it can be killed, or started under torchrun):

    python tests/_rl_toy.py --source base --source-tag T ...       # the flags of `picochat rl`
"""
import sys

from picochat.stages import rl
from picochat.tasks.base import Task


class LetterE(Task):
    def __init__(self, split: str, **kwargs):
        super().__init__(**kwargs)
        self.split = split

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return 64 if self.split == "train" else 16

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"say something ({self.split} {index})"},
                             {"role": "assistant", "content": "eee"}]}

    def reward(self, conversation: dict, completion: str) -> float:
        letters = [c for c in completion.lower() if c.isalpha()]
        return sum(c == "e" for c in letters) / len(letters) if letters else 0.0

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return self.reward(conversation, completion) >= 0.25


rl.TASKS["LetterE"] = LetterE

if __name__ == "__main__":
    sys.exit(rl.main(sys.argv[1:]))
