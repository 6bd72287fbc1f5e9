"""
Chat evaluation (docs/DESIGN.md#chat-evals-and-chatcore): accuracy of a chat model on tasks.

- categorical tasks (ARC, MMLU): one forward pass over a batch of prompts; the answer is the
  allowed letter with the highest logit at the prompt's last position (no sampling, and a letter
  outside the allowed set can never be predicted);
- generative tasks (GSM8K, HumanEval, SpellingBee, Arithmetic, Facts): `num_samples` completions per
  problem (with tool use), decoded with continuous batching across problems (picochat/scheduler.py,
  the server's scheduler); a problem passes if any completion passes the task's own check (pass@k).

Problems are strided across ranks and the counts all-reduced.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from picochat.common import dist_info, print0, progress_bar


@torch.no_grad()
def run_categorical(model, tokenizer, task, batch_size: int = 8, max_problems: int | None = None) -> float:
    info, device = dist_info(), model.lm_head.weight.device
    n = len(task) if max_problems is None else min(max_problems, len(task))
    indices = list(range(info.rank, n, info.world_size))
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(indices), batch_size):
        convs = [task[j] for j in indices[i:i + batch_size]]
        # a prompt longer than the model's context keeps its end, where the question and the
        # answer slot are (a small model's context can be shorter than a few-shot MMLU prompt)
        context = model.config.sequence_len
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        prompts = [p if len(p) <= context else p[:1] + p[len(p) - context + 1:] for p in prompts]  # BOS + tail
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.bos_id, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p)
        hidden = model.trunk(ids)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        logits = model.logits(hidden[torch.arange(len(prompts), device=device), last])  # only where the answer goes
        for r, conv in enumerate(convs):
            letters = conv["letters"]
            letter_ids = [tokenizer.encode(letter)[0] for letter in letters]
            choice = logits[r, letter_ids].argmax().item()
            correct += int(task.evaluate(conv, letters[choice]))
    return _mean(correct, n)


@torch.no_grad()
def run_generative(model, tokenizer, task, num_samples: int = 1, max_new_tokens: int = 512,
                   temperature: float = 0.0, top_k: int | None = 50, max_problems: int | None = None,
                   tool=None, batch_size: int = 16, completions: dict | None = None) -> float:
    """pass@num_samples over the task's first `max_problems` problems. Generation is continuously
    batched (the server's scheduler): up to `batch_size` rows decode together, a finished problem's
    rows are refilled with the next problem at once. Problem j samples with seed j, whatever the
    batch. Completions are then graded four at a time (HumanEval's grader is a subprocess).
    `completions`, a dict, receives this process's completions by problem (for share_of)."""
    from concurrent.futures import ThreadPoolExecutor

    from picochat.engine import Engine
    from picochat.scheduler import Job, Scheduler, run_to_completion
    info, device = dist_info(), model.lm_head.weight.device
    n = len(task) if max_problems is None else min(max_problems, len(task))
    mine = list(range(info.rank, n, info.world_size))
    bar = progress_bar(total=len(mine), desc=f"{type(task).__name__} generating", unit="problem")
    scheduler = Scheduler(Engine(model, tokenizer, tool=tool), max_rows=max(batch_size, num_samples),
                          max_queue=max(1, len(mine)))
    convs = {j: task[j] for j in mine}
    prompts = {j: tokenizer.render_for_completion(convs[j]) for j in mine}
    # prompts that leave no room in the model's context: wrong, without decoding
    fits = [j for j in mine if len(prompts[j]) < scheduler.max_len]
    too_long = len(mine) - len(fits)
    bar.update(too_long)
    jobs = [Job(prompts[j], emit=None, n=num_samples, max_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k or 0, seed=j) for j in fits]
    try:
        results = run_to_completion(scheduler, jobs, on_job_done=lambda _: bar.update(1))
    finally:
        bar.close()
        scheduler.stop()
    texts = {j: [c.text for c in choices] for j, choices in zip(fits, results)}
    if completions is not None:
        completions.update(texts)
    errors = [(j, i) for j, choices in zip(fits, results) for i, c in enumerate(choices) if c.finish_reason == "error"]
    skipped = torch.tensor(too_long, dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(skipped)
    if skipped.item():
        print0(f"warning: {skipped.item()} of {n} {type(task).__name__} prompts do not fit the model's "
               f"{scheduler.max_len}-token context (counted as wrong)")
    if errors:
        print0(f"warning: {len(errors)} of {len(mine) * num_samples} {type(task).__name__} completions failed "
               f"on the engine (counted as wrong); e.g. problem {errors[0][0]} (see the traceback above)")
    with ThreadPoolExecutor(4) as pool:
        passed = pool.map(lambda j: any(task.evaluate(convs[j], c) for c in texts[j]), fits)
        correct = torch.tensor(sum(passed), dtype=torch.long, device=device)
    return _mean(correct, n)


def share_of(completions: dict, test, device="cpu") -> float:
    """The share of the completions (run_generative's, over every process) for which test(text) is
    true: e.g. how often a reply called the search tool."""
    tally = torch.tensor([sum(bool(test(text)) for texts in completions.values() for text in texts),
                          sum(len(texts) for texts in completions.values())], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tally)
    return tally[0].item() / max(1.0, tally[1].item())


def constant_answer_baseline(task, max_problems: int | None = None, answers=range(10)) -> float:
    """Chance for tasks graded on a final '#### n': the accuracy of the best single constant answer
    (e.g. always '#### 1' for letter counting, where most counts are 1)."""
    n = len(task) if max_problems is None else min(max_problems, len(task))
    convs = [task[i] for i in range(n)]
    return max(sum(task.evaluate(c, f"#### {a}") for c in convs) / max(1, n) for a in answers)


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of an accuracy measured on n problems (Wilson score interval: unlike p ± 1.96·se
    it stays inside [0, 1] and is honest at 0 and 1). 64 problems at 0.8: 0.69-0.88."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def with_interval(accuracy: float, n: int) -> str:
    """'0.8047 (95% CI 0.75–0.85, 256 problems)'."""
    lo, hi = wilson_interval(accuracy, n)
    return f"{accuracy:.4f} (95% CI {lo:.2f}–{hi:.2f}, {n} problems)"


def _mean(correct: torch.Tensor, n: int) -> float:
    if dist.is_initialized():
        dist.all_reduce(correct)
    return correct.item() / max(1, n)


def evaluate_task(model, tokenizer, task, **kwargs) -> float:
    if task.eval_type == "categorical":
        keep = {k: v for k, v in kwargs.items() if k in ("batch_size", "max_problems")}
        return run_categorical(model, tokenizer, task, **keep)
    return run_generative(model, tokenizer, task, **kwargs)


# Random-guess baselines for ChatCORE: 4-way multiple choice 0.25, generative 0 (docs/DESIGN.md#chat-evals-and-chatcore).
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
# Tasks chat_eval also runs by name (-a), outside ChatCORE: the offline demo's arithmetic and facts.
EXTRA_TASKS = ("Arithmetic", "Facts")


def chatcore(results: dict[str, float]) -> float | None:
    """Mean centered accuracy over all tasks; None unless every task was run."""
    if set(results) != set(BASELINES):
        return None
    return sum((results[t] - b) / (1 - b) for t, b in BASELINES.items()) / len(BASELINES)
