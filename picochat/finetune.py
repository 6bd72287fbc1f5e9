"""
The training loop midtraining and SFT share: start from an earlier stage's checkpoint, train on a
mixture of conversations packed by ChatPacker, evaluate, checkpoint, resume exactly.

The stages differ only in their defaults and mixtures (stages/mid_train.py, stages/sft.py):
midtraining learns the conversation format on every token; SFT learns only the assistant's tokens.
Each step's loss is the mean over every supervised token of the step, across micro-batches and
ranks, so a micro-batch with no supervised token adds nothing instead of dividing by zero.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from picochat.checkpoint import load_model, save_checkpoint
from picochat.cli import Parser, add_device_args, int_or_auto
from picochat.common import (COMMAND_OF_STAGE, PicochatError, check_model_tag, checkpoint_dir, print0, resolve_dtype, setup_device,
                             shutdown_distributed)
from picochat.data import to_device
from picochat.data.chat_loader import ChatPacker
from picochat.evals.bpb import evaluate_bpb
from picochat.model import head_loss
from picochat.training import (append_metrics, batch_layout, check_shared_checkpoint_dir, load_for_resume,
                               lr_multiplier_by_progress, muon_momentum, run_is_complete, set_schedules, truncate_metrics)


def build_parser(stage: str, description: str, defaults: dict) -> Parser:
    p = Parser(COMMAND_OF_STAGE[stage], description)
    p.add_argument("--mixture", default="full",
                   help="'full': the Hub datasets (nanochat's mixture); 'demo': offline data only; "
                        "or a .jsonl file of your own conversations")
    p.add_argument("--source", default=defaults["source"], help="stage to start from (base, mid or sft)")
    p.add_argument("--source-tag", default="", help="tag of the starting checkpoint (default: the only one)")
    p.add_argument("--source-step", type=int, default=-1, help="step of the starting checkpoint (-1: latest)")
    p.add_argument("--model-tag", default="", help="tag to save under (default: the source's tag)")
    p.add_argument("--max-seq-len", type=int, default=-1, help="tokens per row (-1: the source model's)")
    p.add_argument("--device-batch-size", type=int_or_auto, default=defaults["device_batch_size"],
                   help="rows per micro-batch per process, or 'auto'")
    p.add_argument("--total-batch-size", type=int, default=defaults["total_batch_size"],
                   help="tokens per optimizer step, all processes")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs of the mixture)")
    p.add_argument("--num-epochs", type=float, default=1.0, help="passes over the mixture when --num-iterations is -1")
    p.add_argument("--init-lr-frac", type=float, default=defaults["init_lr_frac"],
                   help="every learning rate, as a fraction of pretraining's")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the embedding (at width 768)")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the head (at width 768)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmdown-ratio", type=float, default=defaults["warmdown_ratio"],
                   help="final fraction of training over which the LR falls linearly to 0")
    p.add_argument("--eval-every", type=int, default=defaults["eval_every"], help="val bits/byte every N steps (-1: end only)")
    p.add_argument("--eval-tokens", type=int, default=defaults["eval_tokens"], help="tokens per val evaluation")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (0: all)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this tag")
    p.add_argument("--resume-if-possible", action="store_true", help="resume when a checkpoint exists, else start")
    add_device_args(p)
    p.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                   help="torch.compile the model (auto: on CUDA only)")
    return p


def run(stage: str, argv, description: str, defaults: dict, mixtures, mask_mode: str) -> int:
    """mixtures(kind) -> (train_task, val_task); mask_mode 'all' (mid) or 'assistant' (SFT)."""
    args = build_parser(stage, description, defaults).parse_args(argv)
    for flag, tag in (("--model-tag", args.model_tag), ("--source-tag", args.source_tag)):
        if tag:
            check_model_tag(tag, flag)  # a name, never a path out of $PICOCHAT_HOME
    info, device = setup_device(args.device)
    try:
        return train(stage, args, info, device, mixtures, mask_mode, defaults)
    finally:
        shutdown_distributed()


def train(stage, args, info, device, mixtures, mask_mode, defaults):
    from picochat.tokenizer import get_tokenizer
    W = info.world_size
    tokenizer = get_tokenizer()
    token_bytes = tokenizer.token_bytes().to(device)
    dtype = resolve_dtype(args.dtype, device)
    model, source_meta = load_model(args.source, args.source_tag or None, device,
                                    step=None if args.source_step < 0 else args.source_step, compute_dtype=dtype)
    model.train()
    config = model.config
    T = config.sequence_len if args.max_seq_len < 0 else args.max_seq_len
    if T > config.sequence_len * 10:
        raise PicochatError(f"--max-seq-len {T} is beyond the model's rotary table ({config.sequence_len * 10})")
    layout = batch_layout(args.total_batch_size, T, W, args.device_batch_size, model, device, dtype,
                          total_is_default=args.total_batch_size == defaults["total_batch_size"])
    total_batch, device_batch, grad_accum = layout.total_batch, layout.device_batch, layout.grad_accum
    num_streams = grad_accum * W
    if args.mixture.endswith(".jsonl"):
        from picochat.tasks.customjson import file_mixture
        train_task, val_task = file_mixture(args.mixture)
    elif args.mixture in ("full", "demo"):
        train_task, val_task = mixtures(args.mixture)
    else:
        raise PicochatError(f"--mixture must be full, demo or a .jsonl file, got {args.mixture!r}")
    source_tag = source_meta["model_tag"]
    model_tag = args.model_tag or source_tag
    ckpt_root = checkpoint_dir(stage, model_tag)
    metrics_path = ckpt_root / "metrics.jsonl"

    check_shared_checkpoint_dir(ckpt_root, device)
    total_conversations = math.ceil(len(train_task) * args.num_epochs)
    optimizer = model.setup_optimizer(args.embedding_lr * args.init_lr_frac, args.unembedding_lr * args.init_lr_frac,
                                      args.matrix_lr * args.init_lr_frac, args.weight_decay)
    horizon = (f"{args.num_iterations} steps" if args.num_iterations > 0
               else f"{args.num_epochs:g} epoch(s) = {total_conversations:,} conversations")
    for key, value in [
        ("source", f"{args.source} checkpoint {source_tag} step {source_meta['step']}"),
        ("model", f"depth {config.n_layer}, width {config.n_embd}, {model.num_params():,} parameters, {dtype}"),
        ("mixture", f"{args.mixture}: {len(train_task):,} train / {len(val_task):,} val conversations"),
        *[("adjusted", note) for note in layout.notes],
        ("total batch", f"{total_batch:,} tokens = {device_batch} rows × {T} × {W} proc × {grad_accum} accum"),
        ("horizon", horizon), ("loss on", "assistant tokens only" if mask_mode == "assistant" else "every token"),
        ("learning rates", ", ".join(f"{g['kind']} {g['lr']:.5g}" for g in optimizer.param_groups)),
        ("checkpoints", str(ckpt_root)),
    ]:
        print0(f"{key:<16} {value}")

    step, loop, states = 0, {"smooth_loss": 0.0, "total_time": 0.0, "last_metrics": {}}, [None] * grad_accum
    resumed_after_final_save = False
    resumed = load_for_resume(ckpt_root, args.resume, args.resume_if_possible, info.rank,
                              {"model_config": config.to_dict(), "world_size": W,
                               "device_batch_size": device_batch, "total_batch_size": total_batch})
    if resumed:
        resume_step, meta, model_state, rank_state = resumed
        model.load_state_dict(model_state)
        optimizer.load_state_dict(rank_state["optimizer"])
        states, step, loop = rank_state["loaders"], resume_step, meta["loop"]
        del resumed, model_state, rank_state  # host copies; the model and optimizer hold their own
        if info.is_master:
            truncate_metrics(metrics_path, step)
        print0(f"resumed from step {step}")
        if loop.get("done") and run_is_complete(metrics_path, step):
            print0("this run is already complete; nothing to do")
            return 0
        resumed_after_final_save = bool(loop.get("done"))  # killed during the final evaluation
    elif info.is_master and metrics_path.exists():
        metrics_path.unlink()

    packers = [ChatPacker(train_task, tokenizer, device_batch, T, stream=info.rank + k * W, num_streams=num_streams,
                          mask_mode=mask_mode, device=device, state=states[k]) for k in range(grad_accum)]

    def consumed_everywhere() -> int:
        """Conversations packed so far by every rank together (a collective: all ranks call it)."""
        n = torch.tensor(sum(p.consumed for p in packers), dtype=torch.float64, device=device)
        if W > 1:
            dist.all_reduce(n)
        return int(n.item())

    def progress(conversations: int) -> float:
        if args.num_iterations > 0:
            return step / args.num_iterations
        return min(1.0, conversations / total_conversations)

    def next_step_data():
        """This rank's batches for one step and their supervised-target count (on the device,
        copied without waiting: the count was taken on the host while packing)."""
        batches = [p.next_batch() for p in packers]
        n = to_device(torch.tensor(float(sum(p.last_supervised for p in packers))), device)
        return batches, n

    def val_bpb() -> float:
        steps = max(1, args.eval_tokens // (device_batch * T * num_streams))
        val = [ChatPacker(val_task, tokenizer, device_batch, T, stream=info.rank + k * W, num_streams=num_streams,
                          mask_mode=mask_mode, device=device) for k in range(grad_accum)] if len(val_task) >= num_streams else []
        if not val:
            return float("nan")
        model.eval()
        result = evaluate_bpb(lambda x, y: model(x, y, loss_reduction="none"),
                              (p.next_batch() for p in val for _ in range(steps) if p.consumed < p.stream_size),
                              token_bytes)
        model.train()
        return result

    def checkpoint(at_step: int, packer_states: list[dict]) -> None:
        meta = {"step": at_step, "stage": stage, "model_tag": model_tag, "model_config": config.to_dict(), "user_config": vars(args) | {"model_tag": model_tag},
                "compute_dtype": str(dtype).replace("torch.", ""), "world_size": W, "device_batch_size": device_batch,
                "total_batch_size": total_batch, "max_seq_len": T, "loop": loop,
                "source": {"stage": args.source, "tag": source_tag, "step": source_meta["step"]}}
        rank_state = {"optimizer": optimizer.state_dict(), "loaders": packer_states}
        save_checkpoint(ckpt_root, at_step, model.state_dict(), meta, rank_state, keep_last=args.keep_last or None)
        print0(f"saved checkpoint step {at_step} → {ckpt_root}")

    compile_model = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    trunk = torch.compile(model.trunk, dynamic=False) if compile_model else model.trunk
    last = loop.get("done", False)
    p = progress(consumed_everywhere())
    if not last:
        batches, n_valid = next_step_data()
    while not last:
        t0 = time.perf_counter()
        lr_mult = lr_multiplier_by_progress(p, args.warmdown_ratio)
        set_schedules(optimizer, lr_mult, muon_momentum(step))
        # the step's loss is the mean over all its supervised tokens, on every rank together
        if W > 1:
            dist.all_reduce(n_valid)
        denom = n_valid.clamp(min=1)
        loss_sum = torch.zeros((), device=device)
        for x, y in batches:
            loss = head_loss(trunk(x), model.lm_head.weight, y, reduction="sum", compiled=compile_model)
            (loss / denom).backward()
            loss_sum += loss.detach()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        # Pack the next step's batches while the device works on this one. The schedule and the
        # checkpoint see the data position from before that, as if nothing had been read ahead.
        consumed_here = sum(pk.consumed for pk in packers)
        saved_packers = [pk.state_dict() for pk in packers]
        step_n_valid = n_valid
        batches, n_valid = next_step_data()
        stats = torch.stack([loss_sum.double(), to_device(torch.tensor(float(consumed_here), dtype=torch.float64), device)])
        if W > 1:
            dist.all_reduce(stats)
        # the step's one wait for the device (for logging and the schedule)
        loss_total, conversations, supervised = torch.cat([stats, step_n_valid.double().view(1)]).tolist()
        train_loss = loss_total / max(1.0, supervised)
        if not math.isfinite(train_loss):
            raise PicochatError(f"loss became {train_loss} at step {step + 1}; lower --init-lr-frac")
        step += 1
        dt = time.perf_counter() - t0
        loop["total_time"] += dt
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss
        p = progress(int(conversations))
        last = step >= args.num_iterations if args.num_iterations > 0 else p >= 1.0
        record = {"step": step, "loss": train_loss, "lr_mult": lr_mult, "progress": p, "dt": dt,
                  "tok_per_sec": total_batch / dt, "supervised_tokens": int(supervised),
                  "time": loop["total_time"]}
        print0(f"{stage} step {step} | loss {train_loss:.4f} | lr× {lr_mult:.2f} | progress {100 * p:.1f}% | "
               f"{dt * 1000:.0f} ms | {record['tok_per_sec']:,.0f} tok/s")
        if last:
            loop["done"], loop["last_metrics"] = True, dict(record)
            checkpoint(step, saved_packers)  # saved before the final evaluation
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            record["val_bpb"] = val_bpb()
            print0(f"{stage} step {step} | val bpb {record['val_bpb']:.4f}")
        if info.is_master:
            append_metrics(metrics_path, record)
        if not last and args.save_every > 0 and step % args.save_every == 0:
            checkpoint(step, saved_packers)
    if resumed_after_final_save:
        record = dict(loop["last_metrics"], val_bpb=val_bpb())
        print0(f"{stage} step {step} | val bpb {record['val_bpb']:.4f}")
        if info.is_master:
            append_metrics(metrics_path, record)
    print0(f"done: {step} steps in {loop['total_time'] / 60:.2f} min")
    return 0
