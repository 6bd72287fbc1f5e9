"""
Reinforcement learning with verifiable rewards, the pieces `picochat rl` (stages/rl.py) puts in the
shared training loop: on-policy rollouts, rewards and advantages, the policy-gradient loss, pass@k.

For each prompt, k completions are sampled at temperature 1 from the current model, with the Python
tool running during sampling (the continuous-batching scheduler decodes every prompt's samples
together). The task's own checker gives each completion a reward; its advantage is the reward minus
the mean reward of the prompt's k samples (no KL term, no reference model). Two variants, off by
default until measured on the demo (docs/LOG.md): advantages divided by the std of the prompt's
rewards (GRPO's, `std_normalize`), and prompts whose samples all scored the same left out of the
step (`uniform`; DAPO's dynamic sampling without the refill): they have no signal, and their tokens
would only dilute the token-count normalization below.
The loss is -Σ advantage · log p(token) over the sampled tokens only (the prompt and the tool output
forced into the stream are not the policy's choices), divided by the number of sampled tokens.

Sampling is seeded per (step, prompt, sample), so a resumed run and a run on any number of
processes draw the same completions (up to float rounding in batched matmuls). Like the seed's RL,
the samples are drawn with top-k (50 by default) while the loss scores them under the full
distribution: an approximation that only matters for the rare token outside the top k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from picochat.engine import Engine
from picochat.ops import reference_head_loss
from picochat.scheduler import Job, Scheduler, run_to_completion


@dataclass
class Rollout:
    """One sampled completion of one prompt."""
    prompt: list[int]
    tokens: list[int]     # generated tokens, the assistant-end token included when it was sampled
    sampled: list[bool]   # False where the token was forced in (the tool's output)
    text: str
    failed: bool = False  # the engine failed on this row (out of memory...): not scored, not trained on
    reward: float = 0.0
    correct: bool = False  # the task's own pass/fail check
    advantage: float = 0.0


def sample_completions(model, tokenizer, prompts: list[list[int]], seeds: list[int], num_samples: int,
                       max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, max_rows: int = 32,
                       tool=None) -> list[list[Rollout]]:
    """num_samples completions of every prompt, decoded together by one scheduler; prompt i's
    sample s is drawn with seed seeds[i] + s, whatever else is in the batch."""
    scheduler = Scheduler(Engine(model, tokenizer, tool=tool), max_rows=max(max_rows, num_samples),
                          max_queue=max(1, len(prompts)))
    jobs = [Job(prompt, emit=None, n=num_samples, max_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, seed=seed, keep_tokens=True) for prompt, seed in zip(prompts, seeds)]
    try:
        with torch.no_grad():
            results = run_to_completion(scheduler, jobs)
    finally:
        scheduler.stop()
    return [[Rollout(prompt, c.tokens or [], c.sampled or [], c.text, failed=c.finish_reason == "error")
             for c in choices] for prompt, choices in zip(prompts, results)]


def score(task, conversation: dict, group: list[Rollout], std_normalize: bool = False) -> None:
    """Rewards from the task's checker; advantages against the mean of the prompt's samples, divided
    by their (population) std with std_normalize where it is not 0. The failed samples are left out:
    they get neither a reward nor an advantage."""
    ok = [r for r in group if not r.failed]
    for r in ok:
        r.reward = float(task.reward(conversation, r.text))
        r.correct = bool(task.evaluate(conversation, r.text))
    mean = sum(r.reward for r in ok) / max(1, len(ok))
    std = (sum((r.reward - mean) ** 2 for r in ok) / max(1, len(ok))) ** 0.5
    for r in ok:
        r.advantage = (r.reward - mean) / (std if std_normalize and std > 0 else 1.0)


def uniform(group: list[Rollout]) -> bool:
    """Every scored sample of the prompt got the same reward: every advantage is 0, nothing to learn."""
    return len({r.reward for r in group if not r.failed}) <= 1


def training_rows(rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(inputs, targets, advantages, number of sampled tokens) for a list of rollouts, padded to the
    longest. targets is -1 wherever nothing is learned: the prompt, forced tool output, padding.
    No rollouts give one row with nothing to learn (every process must run a backward)."""
    if not rollouts:
        return (torch.full((1, 1), pad_id, dtype=torch.long), torch.full((1, 1), -1, dtype=torch.long),
                torch.zeros((1, 1)), 0)
    width = max(len(r.prompt) + len(r.tokens) for r in rollouts) - 1
    inputs = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rollouts), width), -1, dtype=torch.long)
    advantages = torch.zeros((len(rollouts), width), dtype=torch.float32)
    count = 0
    for i, r in enumerate(rollouts):
        seq = r.prompt + r.tokens
        inputs[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        start = len(r.prompt) - 1  # position whose target is the first generated token
        for j, (token, sampled) in enumerate(zip(r.tokens, r.sampled)):
            if sampled:
                targets[i, start + j] = token
                advantages[i, start + j] = r.advantage
                count += 1
    return inputs, targets, advantages, count


def policy_gradient_loss(model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         trunk=None) -> torch.Tensor:
    """Σ advantage · (-log p(target)) over the positions with a target (the caller divides by the
    token count). Full logits per row: RL batches are a few rows of a few hundred tokens."""
    hidden = (trunk or model.trunk)(inputs)
    nll = reference_head_loss(hidden, model.lm_head.weight, targets, reduction="none")  # 0 where target is -1
    return (nll * advantages.reshape(-1).to(nll.dtype)).sum()


def pass_at_k(correct: list[list[bool]], k: int) -> float:
    """Fraction of problems with a correct completion among their first k samples."""
    return sum(any(c[:k]) for c in correct) / max(1, len(correct))
