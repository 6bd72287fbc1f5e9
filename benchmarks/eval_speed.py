"""
Evaluation speed: examples/s of CORE-style multiple choice and of generative GSM8K, batched as
picochat evaluates, against one example at a time (nanochat's way), both measured in this run on the
same model. Also checks that batching did not change a single verdict.

    python benchmarks/eval_speed.py                          # the demo model in $PICOCHAT_HOME
    python benchmarks/eval_speed.py --source sft --model-tag demo --mc-items 128 --gsm8k 32

- multiple choice: the first --mc-items items of an offline CORE multiple-choice task (hellaswag,
  10-shot prompts cropped to the model's context): every choice of up to --batch-rows/4 items in one
  forward pass, vs one item (its 4 choices) per pass;
- generative: the first --gsm8k GSM8K test problems, greedy, --max-new-tokens each, continuous
  batching with --batch-size rows vs one problem at a time.
The model is the demo's base checkpoint for multiple choice and its SFT checkpoint for GSM8K (the
chat model is what GSM8K evaluates); results go to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time

import torch

from picochat.checkpoint import load_model
from picochat.common import dist_info, resolve_device, resolve_dtype
from picochat.evals import core, core_offline
from picochat.evals.chat_eval import run_generative
from picochat.tasks.gsm8k import GSM8K
from picochat.tokenizer import get_tokenizer


class Recording:
    """Wraps a task so the completions it grades can be compared between two runs."""

    def __init__(self, task):
        self.task, self.seen = task, {}
        self.eval_type = task.eval_type

    def __len__(self):
        return len(self.task)

    def __getitem__(self, i):
        return dict(self.task[i], _index=i)

    def evaluate(self, conv, completion):
        self.seen[conv["_index"]] = completion
        return self.task.evaluate(conv, completion)


def time_it(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-tag", default="demo", help="checkpoint tag (default: demo)")
    p.add_argument("--mc-task", default="hellaswag", help="offline CORE task label (default: hellaswag, 10-shot)")
    p.add_argument("--mc-items", type=int, default=128, help="multiple-choice items (default: 128)")
    p.add_argument("--batch-rows", type=int, default=32, help="rows per pass, multiple choice (default: 32)")
    p.add_argument("--gsm8k", type=int, default=32, help="GSM8K problems (default: 32)")
    p.add_argument("--batch-size", type=int, default=16, help="decode rows, generative (default: 16)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per GSM8K answer (default: 128)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16 or float32 (default: auto)")
    args = p.parse_args()

    device = resolve_device("auto", dist_info())
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = get_tokenizer()
    rows = []

    base, _ = load_model("base", args.model_tag, device, compute_dtype=dtype)
    task = next(t for t in core_offline.offline_core_tasks() if t.label == args.mc_task)
    n = min(args.mc_items, len(task.rows))
    core.evaluate_task(base, tokenizer, task, max_per_task=4, max_len=base.config.sequence_len)  # warm-up
    for name, batch_rows in (("one item per pass", 1), (f"batched, {args.batch_rows} rows", args.batch_rows)):
        (acc, _), dt = time_it(lambda: core.evaluate_task(base, tokenizer, task, max_per_task=n, batch_rows=batch_rows,
                                                          max_len=base.config.sequence_len))
        rows.append((f"CORE mc ({task.label}, {task.num_fewshot}-shot)", name, n, dt, acc))
    mc_ratio, mc_same = rows[0][3] / rows[1][3], rows[0][4] == rows[1][4]

    sft, _ = load_model("sft", args.model_tag, device, compute_dtype=dtype)
    gen = {}
    for name, batch in (("one problem at a time", 1), (f"continuous batching, {args.batch_size} rows", args.batch_size)):
        task = Recording(GSM8K(split="test"))
        acc, dt = time_it(lambda: run_generative(sft, tokenizer, task, max_new_tokens=args.max_new_tokens,
                                                 max_problems=args.gsm8k, batch_size=batch))
        gen[name] = task.seen
        rows.append(("GSM8K generative (greedy)", name, args.gsm8k, dt, acc))
    (ref_seen, seen) = gen.values()
    gen_ratio = rows[-2][3] / rows[-1][3]
    gen_same = sum(ref_seen[i] == seen[i] for i in ref_seen)

    print(f"\ndevice {device}, dtype {dtype}, threads {torch.get_num_threads()}, model tag {args.model_tag}")
    print("| eval | how | examples | seconds | examples/s | accuracy |\n|---|---|---:|---:|---:|---:|")
    for what, how, count, dt, acc in rows:
        print(f"| {what} | {how} | {count} | {dt:.1f} | {count / dt:.2f} | {acc:.4f} |")
    print(f"\nmultiple choice: batched is {mc_ratio:.2f}x one item per pass; same accuracy: {mc_same}")
    print(f"generative: batched is {gen_ratio:.2f}x one problem at a time; "
          f"identical completions: {gen_same}/{len(ref_seen)}")


if __name__ == "__main__":
    main()
