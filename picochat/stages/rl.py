"""
Reinforcement learning on tasks with a checker (GSM8K; SpellingBee, Arithmetic and Facts offline), on
the shared training loop (picochat/loop.py) with the pieces in picochat/rl.py.

    picochat rl --task SpellingBee,Arithmetic --source-tag demo     # the offline demo
    picochat rl --task SpellingBee,Arithmetic,Facts --source-tag demo --skip-uniform-groups --std-normalize
    torchrun --nproc_per_node=8 -m picochat rl                      # GSM8K, the d20 recipe

Each step takes --prompts-per-step training problems (split over the processes), samples
--num-samples completions of each at temperature 1 with the tools (Facts: the search tool), rewards
them with the task's checker and takes one policy-gradient step (the advantage is the reward minus
the prompt's mean; with --std-normalize divided by the prompt's std; --skip-uniform-groups leaves
out the prompts whose samples all got the same reward).
Every --eval-every steps: pass@1..k on the task's test problems, into metrics.jsonl. The LR falls
linearly to 0. Resumable like every stage (--save-every, --resume): the sampling seeds follow the
step, so a resumed run draws the same completions.
"""
from __future__ import annotations

import math
import random

import torch

from picochat.checkpoint import load_model
from picochat.cli import Parser, add_device_args, add_source_args, check_tags
from picochat.common import PicochatError, dist_info, print0, resolve_dtype, setup_device, shutdown_distributed
from picochat.loop import LoopSettings, Recipe, StepData, run_loop
from picochat.rl import pass_at_k, policy_gradient_loss, sample_completions, score, training_rows, uniform
from picochat.training import lr_multiplier_by_progress


def _gsm8k(split):
    from picochat.tasks.gsm8k import GSM8K
    return GSM8K(split=split)


def _spelling(split):
    from picochat.tasks.spelling import SpellingBee
    return SpellingBee(size=5000 if split == "train" else 256, split=split)


def _arithmetic(split):
    from picochat.tasks.arithmetic import Arithmetic
    return Arithmetic(size=5000 if split == "train" else 256, split=split)


def _facts(split):
    # train: the questions alone, keys derived at run time by the test's rule; test: the frozen file
    from picochat.tasks.facts import Facts
    return Facts(split="train", count=5000, questions_only=True) if split == "train" else Facts(split="test")


# name -> task of a split ("train" or "test"); a test can add its own
TASKS = {"GSM8K": _gsm8k, "SpellingBee": _spelling, "Arithmetic": _arithmetic, "Facts": _facts}


def build_parser() -> Parser:
    p = Parser("rl", "Reinforcement learning with the task's checker as the reward (on-policy, "
               "advantage = reward - the prompt's mean, no KL).")
    p.add_argument("--task", default="GSM8K", help=f"task, or comma-separated tasks ({', '.join(TASKS)})")
    add_source_args(p, "rl", "sft")
    p.add_argument("--prompts-per-step", type=int, default=16, help="training problems per step, all processes")
    p.add_argument("--num-samples", type=int, default=16, help="completions sampled per problem")
    p.add_argument("--skip-uniform-groups", action="store_true",
                   help="leave out of the step the problems whose samples all got the same reward (no signal)")
    p.add_argument("--std-normalize", action="store_true",
                   help="divide each problem's advantages by the std of its samples' rewards (GRPO)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--top-k", type=int, default=50, help="top-k of the rollouts (0: off)")
    p.add_argument("--device-batch-size", type=int, default=8, help="completions per forward/backward")
    p.add_argument("--rollout-batch", type=int, default=64, help="rows decoding together during sampling")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: --num-epochs of the training problems)")
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training problems")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="every learning rate, as a fraction of pretraining's")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the embedding (at width 768)")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the head (at width 768)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--eval-every", type=int, default=60, help="pass@k on the test problems every N steps (-1: end only)")
    p.add_argument("--eval-problems", type=int, default=400, help="test problems per evaluation (all tasks together)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per test problem: pass@1..k")
    p.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (0: all)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this tag")
    p.add_argument("--resume-if-possible", action="store_true", help="resume when a checkpoint exists, else start")
    p.add_argument("--seed", type=int, default=42, help="seed of the problem order and the sampling")
    add_device_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_tags(args)
    names = [t.strip() for t in args.task.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise PicochatError(f"--task {args.task!r}: unknown task {unknown[0] if unknown else ''!r}; "
                            f"choose from {', '.join(TASKS)}")
    for flag in ("prompts_per_step", "num_samples", "max_new_tokens", "device_batch_size", "eval_samples",
                 "eval_problems"):
        if getattr(args, flag) < 1:
            raise PicochatError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    info, device = setup_device(args.device)
    try:
        return train(args, names, info, device)
    finally:
        shutdown_distributed()


def train(args, names, info, device):
    from picochat.tokenizer import get_tokenizer
    W = info.world_size
    if args.prompts_per_step % W:
        raise PicochatError(f"--prompts-per-step {args.prompts_per_step} does not split over {W} processes; "
                            f"use a multiple of {W}")
    tokenizer = get_tokenizer()
    dtype = resolve_dtype(args.dtype, device)
    model, source_meta = load_model(args.source, args.source_tag or None, device,
                                    step=None if args.source_step < 0 else args.source_step, compute_dtype=dtype)
    model.train()
    train_tasks = [TASKS[n]("train") for n in names]
    test_tasks = {n: TASKS[n]("test") for n in names}
    problems = [(task, i) for task in train_tasks for i in range(len(task))]  # each with its own checker
    steps = (args.num_iterations if args.num_iterations > 0
             else math.ceil(args.num_epochs * len(problems) / args.prompts_per_step))
    model_tag = args.model_tag or source_meta["model_tag"]
    f = args.init_lr_frac
    optimizer = model.setup_optimizer(args.embedding_lr * f, args.unembedding_lr * f, args.matrix_lr * f,
                                      args.weight_decay, lr_frac=f)
    for key, value in [
        ("source", f"{args.source} checkpoint {source_meta['model_tag']} step {source_meta['step']}"),
        ("model", f"depth {model.config.n_layer}, width {model.config.n_embd}, {model.num_params():,} parameters, {dtype}"),
        ("task", f"{', '.join(names)}: {len(problems):,} training problems"),
        ("per step", f"{args.prompts_per_step} problems × {args.num_samples} samples "
                     f"({args.prompts_per_step // W} problems per process), temperature {args.temperature:g}"),
        ("advantage", "reward - the problem's mean" + (", / their std" if args.std_normalize else "")
                      + ("; problems whose samples all score the same: skipped" if args.skip_uniform_groups else "")),
        ("horizon", f"{steps} steps"),
        ("evaluation", f"pass@1..{args.eval_samples} on {args.eval_problems} test problems "
                       + (f"every {args.eval_every} steps" if args.eval_every > 0 else "at the end")),
        ("learning rates", ", ".join(f"{g['kind']} {g['lr']:.5g}" for g in optimizer.param_groups)),
    ]:
        print0(f"{key:<16} {value}")
    recipe = PolicyGradient(args, model, tokenizer, problems, test_tasks, steps)
    meta = {"stage": "rl", "model_tag": model_tag, "model_config": model.config.to_dict(),
            "user_config": vars(args) | {"model_tag": model_tag}, "compute_dtype": str(dtype).replace("torch.", ""),
            "world_size": W, "max_seq_len": model.config.sequence_len, "num_iterations": steps,
            "rollout": {"tasks": names, "prompts_per_step": args.prompts_per_step, "num_samples": args.num_samples,
                        "device_batch_size": args.device_batch_size, "seed": args.seed,
                        # only when on, so a run saved before these flags existed still resumes
                        **{flag: True for flag in ("skip_uniform_groups", "std_normalize") if getattr(args, flag)}},
            "source": {"stage": args.source, "tag": source_meta["model_tag"], "step": source_meta["step"]}}
    return run_loop(recipe, model, optimizer, LoopSettings.from_args(args), meta,
                    must_match=("model_config", "world_size", "rollout"))


class PolicyGradient(Recipe):
    """One step: sample this process's problems, score, and the policy-gradient loss over the
    sampled tokens, normalized by their count over every process."""
    stage = "rl"
    final_metric = "pass@1"
    eval_at_start = True

    def __init__(self, args, model, tokenizer, problems, test_tasks, steps):
        self.args, self.model, self.tokenizer = args, model, tokenizer
        self.problems, self.test_tasks, self.steps = problems, test_tasks, steps  # problems: (task, index)
        self.position = 0  # the next step whose data is prepared
        self._orders = {}

    # --- data: the step's problems, sampled with seeds that follow the step ------------------------
    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            n = len(self.problems)
            self._orders = {epoch: random.Random(self.args.seed * 1_000_003 + epoch).sample(range(n), n)}
        return self._orders[epoch]

    def problems_of_step(self, step: int) -> list[int]:
        """Global sample numbers of the step's problems that this process takes."""
        info, P = dist_info(), self.args.prompts_per_step
        return list(range(step * P + info.rank, (step + 1) * P, info.world_size))

    def sample(self, tasks: list, conversations: list[dict], seeds: list[int], k: int) -> list:
        """k completions of each conversation, scored by its task's checker; None for a prompt that
        leaves no room in the model's context (skipped in training, wrong in evaluation)."""
        a = self.args
        prompts = [self.tokenizer.render_for_completion(c) for c in conversations]
        fits = [i for i, p in enumerate(prompts) if len(p) < self.model.config.sequence_len]
        if len(fits) < len(prompts):
            print(f"warning: {len(prompts) - len(fits)} prompt(s) do not fit the model's "
                  f"{self.model.config.sequence_len}-token context; skipped", flush=True)
        groups = [None] * len(prompts)
        sampled = sample_completions(self.model, self.tokenizer, [prompts[i] for i in fits], [seeds[i] for i in fits],
                                     k, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                     max_rows=a.rollout_batch)
        for i, group in zip(fits, sampled):
            score(tasks[i], conversations[i], group, std_normalize=a.std_normalize)
            groups[i] = group
        failed = sum(r.failed for group in sampled for r in group)
        if failed:
            print(f"warning: {failed} completion(s) failed on the engine (see the traceback above); "
                  f"not trained on", flush=True)
        return groups

    def next_step(self) -> StepData:
        a, n = self.args, len(self.problems)
        numbers = self.problems_of_step(self.position)
        self.position += 1
        picked = [self.problems[self.order(g // n)[g % n]] for g in numbers]
        conversations = [task[i] for task, i in picked]
        seeds = [(a.seed << 32) + g * a.num_samples for g in numbers]
        self.model.eval()
        groups = self.sample([task for task, _ in picked], conversations, seeds, a.num_samples)
        self.model.train()
        scored = [group for group in groups if group]
        learned = [group for group in scored if not (a.skip_uniform_groups and uniform(group))]
        rollouts = [r for group in learned for r in group if not r.failed]
        every = [r for group in scored for r in group if not r.failed]  # the step's rewards, skipped or not
        micro, count = [], 0
        for i in range(0, max(1, len(rollouts)), a.device_batch_size):  # at least one (maybe empty) batch
            inputs, targets, advantages, c = training_rows(rollouts[i:i + a.device_batch_size],
                                                           self.tokenizer.bos_id)
            device = self.model.lm_head.weight.device
            micro.append((inputs.to(device), targets.to(device), advantages.to(device)))
            count += c
        return StepData(micro, count=float(count), sums={
            "reward": sum(r.reward for r in every), "samples": float(len(every)),
            "correct": float(sum(r.correct for r in every)),
            "generated_tokens": float(sum(len(r.tokens) for r in every)), "sampled_tokens": float(count),
            "groups": float(len(scored)), "uniform_groups": float(sum(uniform(g) for g in scored))})

    def micro_loss(self, batch):
        return policy_gradient_loss(self.model, *batch)

    def on_resume(self, meta: dict) -> None:
        self.steps = meta["num_iterations"]  # the horizon the run started with, whatever the flags say now

    def data_state(self):
        return {"position": self.position}

    def load_data_state(self, state) -> None:
        self.position = state["position"]

    # --- schedule -------------------------------------------------------------------------------
    def progress(self, step, sums) -> float:
        return step / self.steps

    def may_end_at(self, step) -> bool:
        return step >= self.steps

    def lr_multiplier(self, step, progress) -> float:
        return lr_multiplier_by_progress(progress, 1.0)  # linear to 0 over the whole run

    def step_record(self, sums, dt) -> dict:
        n = max(1.0, sums["samples"])
        return {"reward": sums["reward"] / n, "correct": sums["correct"] / n,
                "mean_tokens": sums["generated_tokens"] / n, "sampled_tokens": int(sums["sampled_tokens"]),
                "uniform_groups": sums["uniform_groups"] / max(1.0, sums["groups"])}

    # --- evaluation: pass@k on the test problems, the same seeds every time -----------------------
    def evaluate(self, step) -> dict:
        a, info = self.args, dist_info()
        k = a.eval_samples
        names = list(self.test_tasks)
        per_task = [a.eval_problems // len(names) + (i < a.eval_problems % len(names)) for i in range(len(names))]
        results = {}
        device = self.model.lm_head.weight.device
        correct_all = torch.zeros(k + 1, dtype=torch.float64, device=device)
        for name, count in zip(names, per_task):
            task = self.test_tasks[name]
            count = min(count, len(task))
            mine = list(range(info.rank, count, info.world_size))
            seeds = [(a.seed << 32) + (1 << 31) + j * k for j in mine]
            conversations = [task[j] for j in mine]
            groups = self.sample([task] * len(mine), conversations, seeds, k) if mine else []
            correct = [[r.correct for r in group] if group else [False] * k for group in groups]
            tally = torch.tensor([len(correct)] + [pass_at_k(correct, i) * len(correct) for i in range(1, k + 1)],
                                 dtype=torch.float64, device=device)
            if info.world_size > 1:
                torch.distributed.all_reduce(tally)
            total, *passed = tally.tolist()
            correct_all += tally
            results[f"{name}/pass@1"] = passed[0] / max(1.0, total)
            results[f"{name}/pass@{k}"] = passed[-1] / max(1.0, total)
        total, *passed = correct_all.tolist()
        results.update({f"pass@{i}": passed[i - 1] / max(1.0, total) for i in range(1, k + 1)})
        if len(names) == 1:
            results = {key: v for key, v in results.items() if "/" not in key}
        return results
