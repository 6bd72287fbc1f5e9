"""
Supervised fine-tuning: polish a midtrained model on a small curated mixture, learning only the
assistant's tokens (completion-only loss, docs/DESIGN.md#midtraining-and-sft).

    picochat sft --mixture demo
    torchrun --nproc_per_node=8 -m picochat sft

Resumable like base_train (--save-every, --resume); the loop lives in picochat/finetune.py.
"""
from __future__ import annotations

from picochat import finetune
from picochat.tasks.mixtures import sft_mixture

DEFAULTS = dict(source="mid", device_batch_size=8, total_batch_size=65536, init_lr_frac=0.02,
                warmdown_ratio=1.0, eval_every=100, eval_tokens=4 * 65536)


def main(argv=None):
    return finetune.run("sft", argv, "Fine-tune a chat model on curated conversations (loss on assistant tokens).",
                        DEFAULTS, sft_mixture, mask_mode="assistant")
