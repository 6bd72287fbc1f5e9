"""
Supervised fine-tuning: polish a midtrained model on a small curated mixture, learning only the
assistant's tokens (completion-only loss, docs/DESIGN.md#midtraining-and-sft).

    picochat sft --mixture demo
    torchrun --nproc_per_node=8 -m picochat sft

Resumable like base_train (--save-every, --resume); the loop lives in picochat/finetune.py.
"""
from __future__ import annotations

from picochat import finetune

DEFAULTS = dict(source="mid", device_batch_size=8, total_batch_size=65536, init_lr_frac=0.02,
                warmdown_ratio=1.0, eval_every=100, eval_tokens=4 * 65536)


def mixtures(kind: str):
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


def main(argv=None):
    return finetune.run("sft", argv, "Fine-tune a chat model on curated conversations (loss on assistant tokens).",
                        DEFAULTS, mixtures, mask_mode="assistant")
