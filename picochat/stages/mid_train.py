"""
Midtraining: teach a base model the conversation format, tool use, multiple choice and spelling,
on every token of the conversations (the seed recipe, docs/DESIGN.md#midtraining-and-sft).

    picochat mid_train --mixture demo                      # offline data, after the demo base model
    torchrun --nproc_per_node=8 -m picochat mid_train      # nanochat's ~850K-row mixture from the Hub

Resumable like base_train (--save-every, --resume); the loop lives in picochat/finetune.py.
"""
from __future__ import annotations

from picochat import finetune
from picochat.tasks.mixtures import mid_mixture

DEFAULTS = dict(source="base", device_batch_size=32, total_batch_size=524288, init_lr_frac=1.0,
                warmdown_ratio=0.2, eval_every=150, eval_tokens=20 * 524288)


def main(argv=None):
    return finetune.run("mid", argv, "Midtrain a base model on conversations (loss on every token).",
                        DEFAULTS, mid_mixture, mask_mode="all")
