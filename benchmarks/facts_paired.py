"""
Chat checkpoints on the same held-out Facts questions, paired: each one's accuracy, and each one's
difference from the first, with 95% intervals. A paired difference is far tighter than two separate intervals
(most questions are answered the same by both), which is what an RL variant's effect needs.

    PICOCHAT_HOME=/work/demoB python benchmarks/facts_paired.py sft:demo rl:demo
    PICOCHAT_HOME=/work/demoB python benchmarks/facts_paired.py rl:demo rl:demo-n16 rl:demo-s40

Each side is SOURCE:TAG (a stage and a checkpoint tag under $PICOCHAT_HOME). Both decode greedily
in fp32 by default, so a question's outcome depends on the checkpoint only. The search index must
exist (`picochat index build --dataset demo`).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from picochat.checkpoint import load_model  # noqa: E402
from picochat.common import resolve_dtype  # noqa: E402
from picochat.evals.chat_eval import run_generative, wilson_interval  # noqa: E402
from picochat.stages.chat_eval import need_index  # noqa: E402
from picochat.tasks.facts import Facts  # noqa: E402
from picochat.tokenizer import get_tokenizer  # noqa: E402


def outcomes(spec: str, task, tokenizer, args) -> list[bool]:
    """Whether each of the first max_problems questions was answered right by SOURCE:TAG."""
    source, _, tag = spec.partition(":")
    cpu = torch.device("cpu")
    model, meta = load_model(source, tag or None, cpu, compute_dtype=resolve_dtype(args.dtype, cpu),
                             tokenizer=tokenizer)
    completions: dict = {}
    run_generative(model, tokenizer, task, max_new_tokens=args.max_new_tokens, temperature=0.0,
                   max_problems=args.max_problems, batch_size=args.batch_size, completions=completions)
    print(f"{spec}: {meta['model_tag']} step {meta['step']}", flush=True)
    return [any(task.evaluate(task[j], text) for text in completions.get(j, [])) for j in range(args.max_problems)]


def paired(a: list[bool], b: list[bool]) -> tuple[float, float, float]:
    """Mean of b - a over the questions and its 95% interval (normal, on the per-question
    differences)."""
    d = [int(y) - int(x) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("a", help="the reference checkpoint, SOURCE:TAG (e.g. sft:demo)")
    p.add_argument("b", nargs="+", help="the checkpoints compared with it, SOURCE:TAG (e.g. rl:demo)")
    p.add_argument("--max-problems", type=int, default=256, help="held-out questions asked (at least 1)")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens per reply")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoding together")
    p.add_argument("--dtype", default="float32", help="compute dtype (fp32: the same tokens whatever the batch)")
    args = p.parse_args()
    if args.max_problems < 1:
        p.error(f"--max-problems must be at least 1, got {args.max_problems}")
    need_index()
    tokenizer, task = get_tokenizer(), Facts(split="test")
    n = args.max_problems = min(args.max_problems, len(task))
    specs = [args.a, *args.b]
    got = {spec: outcomes(spec, task, tokenizer, args) for spec in specs}
    print(f"\n{'checkpoint':<24} {'Facts':>7}  95% interval   minus {args.a}, 95% interval   right only here / only there")
    for spec in specs:
        acc = sum(got[spec]) / n
        lo, hi = wilson_interval(acc, n)
        line = f"{spec:<24} {acc:>7.3f}  {lo:.3f}–{hi:.3f}"
        if spec != args.a:
            mean, dlo, dhi = paired(got[args.a], got[spec])
            only_here = sum(y and not x for x, y in zip(got[args.a], got[spec]))
            only_there = sum(x and not y for x, y in zip(got[args.a], got[spec]))
            line += f"   {mean:+.3f} ({dlo:+.3f} to {dhi:+.3f})   {only_here} / {only_there}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
