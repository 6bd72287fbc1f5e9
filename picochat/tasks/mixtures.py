"""
The conversation mixtures of midtraining and SFT, for `--mixture full` (the Hub datasets, the seed's
recipe) and `--mixture demo` (offline sources only). A mixture is a (train, val) pair of tasks.
"""
from __future__ import annotations

# Sizes of the demo mixtures' general conversation and SpellingBee (docs/DATA.md has the token shares).
DEMO_CHATS, SFT_CHATS = 2500, 1000    # ChitChat windows: midtraining's, then SFT's, disjoint
DEMO_QA, SFT_QA = 2000, 500           # EncyclopediaQA questions, the same way (were 7,000 and 2,000)
# Facts questions, answered with the search tool (candidates; ~13% are left out, docs/TOOLS.md): they
# took most of EncyclopediaQA's tokens, since a small model answering from memory gets facts wrong.
# 2,539 and 855 conversations of ~200 tokens (the tool's output included); with EncyclopediaQA's
# 2,000 and 500 that is 0.72M and 0.22M tokens, where EncyclopediaQA alone had 0.75M and 0.21M.
DEMO_FACTS, SFT_FACTS = 3000, 1000
MID_SPELLING_BEE, SFT_SPELLING_BEE = 6_000, 1_700  # mid's was 10,000: 57% of its tokens, now 39%


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
    # Offline: synthetic tasks, the MMLU/ARC splits the evaluations do not use (they test on test),
    # and general conversation (tasks/smalltalk.py, tasks/encyclopedia.py) on their train splits.
    # SpellingBee grows with the mixture so its share of the tokens stays about what it was.
    from picochat.tasks.arithmetic import Arithmetic
    from picochat.tasks.encyclopedia import EncyclopediaQA
    from picochat.tasks.facts import Facts
    from picochat.tasks.smalltalk import Chatterbot, ChitChat
    train = TaskMixture([SpellingBee(size=MID_SPELLING_BEE, split="train"), SimpleSpelling(size=2000, split="train"),
                         Arithmetic(size=2000, split="train"), IdentityConversations(), IdentityConversations(),
                         MMLU(subset="all", split="validation", source="offline"),
                         ARC(subset="ARC-Easy", split="validation", source="offline"),
                         ARC(subset="ARC-Challenge", split="validation", source="offline"),
                         ChitChat(split="train", stop=DEMO_CHATS), Chatterbot(),
                         EncyclopediaQA(split="train", stop=DEMO_QA), Facts(split="train", count=DEMO_FACTS)])
    val = TaskMixture([SpellingBee(size=200, split="test"), Arithmetic(size=200, split="test"),
                       ChitChat(split="test", stop=200), EncyclopediaQA(split="test", stop=200)])
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
    from picochat.tasks.encyclopedia import EncyclopediaQA
    from picochat.tasks.facts import Facts
    from picochat.tasks.smalltalk import Chatterbot, ChitChat
    # Conversations midtraining did not see (the slices after its own), and every other chatterbot exchange.
    # No MMLU: it repeated midtraining's 1,531 questions and was 27% of SFT's tokens.
    train = TaskMixture([ARC(subset="ARC-Easy", split="validation", source="offline"),
                         ARC(subset="ARC-Challenge", split="validation", source="offline"),
                         IdentityConversations(),
                         SimpleSpelling(size=300, split="train"), SpellingBee(size=SFT_SPELLING_BEE, split="train"),
                         Arithmetic(size=300, split="train"),
                         ChitChat(split="train", start=DEMO_CHATS, stop=DEMO_CHATS + SFT_CHATS),
                         Chatterbot(step=2), EncyclopediaQA(split="train", start=DEMO_QA, stop=DEMO_QA + SFT_QA),
                         Facts(split="train", first=DEMO_FACTS, count=SFT_FACTS)])
    val = TaskMixture([SpellingBee(size=200, split="test"), Arithmetic(size=200, split="test"),
                       ChitChat(split="test", stop=200), EncyclopediaQA(split="test", stop=200)])
    return train, val
