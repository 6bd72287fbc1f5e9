"""
The training loop every stage runs (base_train, mid_train, sft, rl). A stage is a `Recipe`: its
data, its loss, its schedule and its evaluation; everything else is decided here, once:

- resume: the newest intact checkpoint of the tag, with its optimizer shard, data position and RNG;
  the metrics.jsonl lines written after it are dropped (the resumed run writes them again);
- the one rule for "this run is complete": the final checkpoint says `done` and the last line of
  metrics.jsonl is the final step with the recipe's final metric. Resuming a complete run does
  nothing; resuming one killed during its final evaluation runs only that evaluation;
- one optimizer step: the step's loss is the sum of the recipe's per-micro-batch losses divided by
  the count the recipe gives (tokens, supervised tokens, sampled tokens) summed over all processes,
  so every process and micro-batch weighs by its data, and 1 process equals N up to rounding;
- the next step's data is prepared while the device still works on this one (nothing has waited
  for it yet), and the data position saved with a checkpoint is the one before that;
- one wait for the device per step (the numbers to log), LR and momentum schedules, the record
  written to metrics.jsonl, progress lines, and the final checkpoint saved before the final
  evaluation, so a crash in the evaluation loses no training.

    recipe = MyStage(...)                       # a Recipe subclass
    return run_loop(recipe, model, optimizer, settings, meta, must_match)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from picochat.checkpoint import save_checkpoint
from picochat.common import PicochatError, checkpoint_dir, dist_info, print0
from picochat.data import to_device
from picochat.training import (append_metrics, check_shared_checkpoint_dir, load_for_resume, muon_momentum,
                               run_is_complete, set_schedules, truncate_metrics)


@dataclass
class StepData:
    """One optimizer step's data for this process, prepared ahead of the step.
    micro_batches: whatever the recipe's micro_loss takes, one backward each;
    count: this process's share of the loss denominator (known on the host when the data is built);
    sums: host numbers summed over all processes into the step's record (e.g. conversations read,
    rewards); the recipe's progress() sees them."""
    micro_batches: list
    count: float
    sums: dict[str, float] = field(default_factory=dict)


class Recipe:
    """What a training stage supplies to the loop. Subclasses set `stage` and override the methods
    that raise; the rest have defaults."""
    stage: str = ""
    final_metric = "val_bpb"  # the metric the final evaluation writes: its presence marks a complete run
    eval_at_start = False     # evaluate before the first step of a fresh run (a baseline)
    cheap_data = False        # next_step() is cheap: prepare it early even when this step may be the last
    untimed_first_step = False  # the first step holds compilation and warm-up: leave it out of the time

    def next_step(self) -> StepData:
        raise NotImplementedError

    def micro_loss(self, batch) -> torch.Tensor:
        """The summed loss of one micro-batch, with gradients (the loop divides and backpropagates)."""
        raise NotImplementedError

    def data_state(self):
        """The data position (and anything random the data depends on), picklable; saved per process."""
        raise NotImplementedError

    def load_data_state(self, state) -> None:
        raise NotImplementedError

    def progress(self, step: int, sums: dict[str, float]) -> float:
        """Fraction of training done after `step` steps (1.0 ends the run); sums: the step's totals."""
        raise NotImplementedError

    def lr_multiplier(self, step: int, progress: float) -> float:
        """LR multiplier of step `step` (0-based), given the progress after the step before it."""
        raise NotImplementedError

    def muon_schedule(self, step: int) -> tuple[float, float | None]:
        """Muon's momentum and weight decay at step `step` (None: leave the decay as set up)."""
        return muon_momentum(step), None

    def may_end_at(self, step: int) -> bool:
        """Whether the run may end after `step` steps (then the data position is snapshotted for a
        final checkpoint). True is always safe."""
        return True

    def evaluate(self, step: int) -> dict:
        """Metrics of an evaluation at `step` (every process calls it: it may use collectives)."""
        return {}

    def step_record(self, sums: dict[str, float], dt: float) -> dict:
        """The stage's own numbers for the step's record (throughput, rewards, ...)."""
        return {}

    def describe(self, record: dict) -> str:
        """The step_record numbers as the progress line shows them."""
        return " | ".join(f"{k} {_fmt(v)}" for k, v in record.items())

    def after_step(self, step: int, last: bool) -> None:
        """Anything else at the end of a step (base_train prints samples)."""

    def on_resume(self, meta: dict) -> None:
        """Called with the checkpoint's meta when a run resumes."""


@dataclass
class LoopSettings:
    eval_every: int = -1   # evaluate every N steps (-1: only at the end)
    save_every: int = -1   # checkpoint every N steps (-1: only at the end)
    keep_last: int = 2     # checkpoints to keep (0: all)
    resume: bool = False
    resume_if_possible: bool = False

    @classmethod
    def from_args(cls, args) -> "LoopSettings":
        return cls(args.eval_every, args.save_every, args.keep_last, args.resume, args.resume_if_possible)


def run_loop(recipe: Recipe, model, optimizer, settings: LoopSettings, meta: dict, must_match: tuple) -> int:
    """Train `model` with `optimizer` as `recipe` says. `meta` is what the stage saves in every
    checkpoint (model_tag and model_config at least); the keys in `must_match` must be equal in a
    checkpoint to resume from it (the data order and optimizer shards depend on them)."""
    info = dist_info()
    W = info.world_size
    device = model.lm_head.weight.device
    ckpt_root = checkpoint_dir(recipe.stage, meta["model_tag"])
    metrics_path = ckpt_root / "metrics.jsonl"
    check_shared_checkpoint_dir(ckpt_root, device)

    step = 0
    loop = {"smooth_loss": 0.0, "total_time": 0.0, "progress": 0.0, "timed_progress": 0.0, "done": False,
            "last_metrics": {}}
    resumed = load_for_resume(ckpt_root, settings.resume, settings.resume_if_possible, info.rank,
                              {key: meta[key] for key in must_match})
    if resumed:
        resume_step, saved_meta, model_state, rank_state = resumed
        model.load_state_dict(model_state)
        optimizer.load_state_dict(rank_state["optimizer"])
        recipe.load_data_state(rank_state["loaders"])
        if "rng" in rank_state:  # mid/SFT checkpoints written before the loop was shared have none
            torch.set_rng_state(rank_state["rng"])
        step, loop = resume_step, {**loop, **saved_meta["loop"]}
        if "done" not in saved_meta["loop"]:  # written before the loop was shared: base knew its horizon
            loop["done"] = step >= saved_meta.get("num_iterations", float("inf"))
        del resumed, model_state, rank_state  # host copies; the model and optimizer hold their own
        recipe.on_resume(saved_meta)
        if info.is_master:
            truncate_metrics(metrics_path, step)
        print0(f"resumed from step {step}")
        if loop["done"] and run_is_complete(metrics_path, step, recipe.final_metric):
            print0("this run is already complete; nothing to do")
            return 0
    elif info.is_master and metrics_path.exists():
        metrics_path.unlink()
    killed_in_final_eval = loop["done"]

    def write(record: dict) -> None:
        if info.is_master:
            append_metrics(metrics_path, record)

    def checkpoint(at_step: int, position) -> None:
        if position is None:
            raise RuntimeError(f"{type(recipe).__name__} ended at step {at_step}, where its may_end_at said "
                               f"it could not: its data position was not kept")
        data_state, rng = position
        rank_state = {"optimizer": optimizer.state_dict(), "rng": rng, "loaders": data_state}
        save_checkpoint(ckpt_root, at_step, model.state_dict(), dict(meta, step=at_step, loop=loop), rank_state,
                        keep_last=settings.keep_last or None)
        print0(f"saved checkpoint step {at_step} → {ckpt_root}")

    def evaluate(record: dict) -> None:
        model.eval()
        found = recipe.evaluate(record["step"])
        model.train()
        record.update(found)
        if found:
            print0(f"{recipe.stage} step {record['step']} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in found.items()))

    def save_due(s: int) -> bool:
        return settings.save_every > 0 and s % settings.save_every == 0

    model.train()
    if step == 0 and not loop["done"] and recipe.eval_at_start and settings.eval_every > 0:
        record = {"step": 0}
        evaluate(record)
        write(record)

    data = recipe.next_step() if not loop["done"] else None
    last = loop["done"]
    while not last:
        t0 = time.perf_counter()
        lr_mult = recipe.lr_multiplier(step, loop["progress"])
        set_schedules(optimizer, lr_mult, *recipe.muon_schedule(step))
        keys = list(data.sums)
        # count and sums are host numbers: copied without waiting, summed over processes in one
        # collective; the denominator stays on the device
        head = to_device(torch.tensor([data.count, *data.sums.values()], dtype=torch.float64), device)
        if W > 1:
            dist.all_reduce(head)
        # the optimizer averages gradients over processes: each one divides by 1/W of the total
        denom = head[0].clamp(min=1).float() / W
        loss_sum = torch.zeros((), device=device)
        for batch in data.micro_batches:
            loss = recipe.micro_loss(batch)
            (loss / denom).backward()
            loss_sum += loss.detach().float()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        # The next step's data is prepared while the device works on this one. The checkpoint after
        # this step records the data position from before that.
        may_end = recipe.may_end_at(step + 1)
        saved = (recipe.data_state(), torch.get_rng_state()) if may_end or save_due(step + 1) else None
        data = recipe.next_step() if recipe.cheap_data or not may_end else None
        if W > 1:
            dist.all_reduce(loss_sum)
        totals = torch.cat([loss_sum.double().view(1), head]).tolist()  # the step's one wait for the device
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        train_loss = totals[0] / max(1.0, totals[1])
        if not math.isfinite(train_loss):
            raise PicochatError(f"loss became {train_loss} at step {step}; lower the learning rate or check the data")
        sums = dict(zip(keys, totals[2:]))
        before, loop["progress"] = loop["progress"], min(1.0, recipe.progress(step, sums))
        last = loop["progress"] >= 1.0
        if not last and data is None:
            data = recipe.next_step()
        if step > 1 or not recipe.untimed_first_step:
            loop["total_time"] += dt
            loop["timed_progress"] += loop["progress"] - before
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss
        record = {"step": step, "loss": train_loss, "smooth_loss": loop["smooth_loss"] / (1 - 0.9 ** step),
                  "lr_mult": lr_mult, "progress": loop["progress"], "dt": dt, "time": loop["total_time"]}
        own = recipe.step_record(sums, dt)
        record.update(own)
        done_frac, timed = loop["progress"], loop["timed_progress"]
        eta = loop["total_time"] * (1 - done_frac) / timed if timed > 0 else float("nan")
        extra = f" | {recipe.describe(own)}" if own else ""
        print0(f"{recipe.stage} step {step} | loss {train_loss:.4f} | lr× {lr_mult:.2f} | "
               f"{100 * done_frac:.1f}% | {dt * 1000:.0f} ms{extra} | ETA {eta / 60:.1f} min")
        if last:  # saved before the final evaluation: a crash there loses no training
            loop["done"], loop["last_metrics"] = True, dict(record)
            checkpoint(step, saved)
        if last or (settings.eval_every > 0 and step % settings.eval_every == 0):
            evaluate(record)
        recipe.after_step(step, last)
        write(record)
        if not last and save_due(step):
            checkpoint(step, saved)
    if killed_in_final_eval:
        record = dict(loop["last_metrics"])
        evaluate(record)
        recipe.after_step(step, True)
        write(record)
    if device.type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print0(f"done: {recipe.stage}, {step} steps, training time {loop['total_time'] / 60:.2f} min")
    return 0


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value)
