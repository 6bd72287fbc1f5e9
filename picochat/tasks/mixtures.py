"""
The conversation mixtures of midtraining and SFT, for `--mixture full` (the Hub datasets, the seed's
recipe) and `--mixture demo` (offline sources only). A mixture is a (train, val) pair of tasks.
"""
from __future__ import annotations


def mid_mixture(kind: str):
    """Midtraining: (train, val) for --mixture full (the Hub) or demo (offline)."""
    from picochat.tasks.arc import ARC
    from picochat.tasks.base import TaskMixture
    from picochat.tasks.gsm8k import GSM8K
    from picochat.tasks.identity import IdentityConversations
    from picochat.tasks.mmlu import MMLU
    from picochat.tasks.smoltalk import SmolTalk
    from picochat.tasks.spelling import SimpleSpelling, SpellingBee
    if kind == "full":
        train = TaskMixture([SmolTalk(split="train"), MMLU(subset="all", split="auxiliary_train"),
                             GSM8K(split="train"), IdentityConversations(), IdentityConversations(),
                             SimpleSpelling(size=200_000, split="train"), SpellingBee(size=80_000, split="train")])
        val = TaskMixture([SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200),
                           GSM8K(split="test", stop=420)])
        return train, val
    # Offline: synthetic tasks plus the MMLU/ARC splits the evaluations do not use (they test on test).
    from picochat.tasks.arithmetic import Arithmetic
    train = TaskMixture([SpellingBee(size=8000, split="train"), SimpleSpelling(size=2000, split="train"),
                         Arithmetic(size=2000, split="train"), IdentityConversations(), IdentityConversations(),
                         MMLU(subset="all", split="validation", source="offline"),
                         ARC(subset="ARC-Easy", split="validation", source="offline"),
                         ARC(subset="ARC-Challenge", split="validation", source="offline")])
    val = TaskMixture([SpellingBee(size=200, split="test"), Arithmetic(size=200, split="test")])
    return train, val


def sft_mixture(kind: str):
    """SFT: (train, val) for --mixture full (the Hub) or demo (offline)."""
    from picochat.tasks.arc import ARC
    from picochat.tasks.base import TaskMixture
    from picochat.tasks.identity import IdentityConversations
    from picochat.tasks.spelling import SimpleSpelling, SpellingBee
    if kind == "full":
        from picochat.tasks.gsm8k import GSM8K
        from picochat.tasks.smoltalk import SmolTalk
        train = TaskMixture([ARC(subset="ARC-Easy", split="train"), ARC(subset="ARC-Challenge", split="train"),
                             GSM8K(split="train"), SmolTalk(split="train", stop=10_000), IdentityConversations(),
                             SimpleSpelling(size=300, split="train"), SpellingBee(size=300, split="train")])
        return train, SmolTalk(split="test")
    from picochat.tasks.arithmetic import Arithmetic
    from picochat.tasks.mmlu import MMLU
    train = TaskMixture([ARC(subset="ARC-Easy", split="validation", source="offline"),
                         ARC(subset="ARC-Challenge", split="validation", source="offline"),
                         MMLU(subset="all", split="validation", source="offline"), IdentityConversations(),
                         SimpleSpelling(size=300, split="train"), SpellingBee(size=1000, split="train"),
                         Arithmetic(size=300, split="train")])
    val = TaskMixture([SpellingBee(size=200, split="test"), Arithmetic(size=200, split="test")])
    return train, val
