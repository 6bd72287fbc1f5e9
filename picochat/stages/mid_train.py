"""
Midtraining: teach a base model the conversation format, tool use, multiple choice and spelling,
on every token of the conversations (the seed recipe, docs/DESIGN.md#midtraining-and-sft).

    picochat mid_train --mixture demo                      # offline data, after the demo base model
    torchrun --nproc_per_node=8 -m picochat mid_train      # nanochat's ~850K-row mixture from the Hub

Resumable like base_train (--save-every, --resume); the loop lives in picochat/finetune.py.
"""
from __future__ import annotations

from picochat import finetune

DEFAULTS = dict(source="base", device_batch_size=32, total_batch_size=524288, init_lr_frac=1.0,
                warmdown_ratio=0.2, eval_every=150, eval_tokens=20 * 524288)


def mixtures(kind: str):
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


def main(argv=None):
    return finetune.run("mid", argv, "Midtrain a base model on conversations (loss on every token).",
                        DEFAULTS, mixtures, mask_mode="all")
