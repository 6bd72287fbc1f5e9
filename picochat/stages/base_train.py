"""
Pretrain the base model. One process or many under torchrun, on a CPU or GPUs.

    picochat base_train --depth 4 --dataset demo --max-seq-len 512 --device-batch-size 32 \\
        --total-batch-size 16384 --num-iterations 200
    torchrun --nproc_per_node=8 -m picochat base_train --depth 20        # the d20 recipe

Everything is derived from --depth (width, heads, horizon, LRs) and printed before training;
every derived value has a flag. The loop reads top to bottom: evaluate / sample / checkpoint when
due, then one optimizer step of `grad_accum` micro-batches. Checkpoints are atomic and `--resume`
continues exactly: same data, same optimizer state, same losses as an uninterrupted run.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from picochat.checkpoint import save_checkpoint
from picochat.cli import Parser, add_device_args, int_or_auto
from picochat.common import (PicochatError, check_model_tag, checkpoint_dir, peak_flops, print0, resolve_dtype,
                             seed_everything, setup_device, shutdown_distributed)
from picochat.data.loader import PackingLoader
from picochat.engine import Engine
from picochat.evals.bpb import evaluate_bpb
from picochat.model import ASPECT_RATIO, GPT, HEAD_DIM, SEQUENCE_LEN, config_from_depth, head_loss
from picochat.training import (append_metrics, batch_layout, check_shared_checkpoint_dir,
                               estimate_eval_memory_gib, estimate_memory_gib, load_for_resume, lr_multiplier_by_step, muon_momentum, run_is_complete,
                               set_schedules, truncate_metrics)

SAMPLE_PROMPTS = [  # the seed's fixed prompts, plus one for the Shakespeare demo corpus
    "The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
    "If 5*x + 3 = 13, then x is", "To be, or not to be,",
]


def build_parser() -> Parser:
    p = Parser("base_train", "Pretrain a base GPT on a shard dataset. Width, heads, horizon and "
               "learning rates are derived from --depth; each can be overridden.")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers (the one dial)")
    g.add_argument("--aspect-ratio", type=int, default=ASPECT_RATIO,
                   help="model width = depth × aspect ratio, rounded up to a multiple of --head-dim")
    g.add_argument("--head-dim", type=int, default=HEAD_DIM, help="attention head dimension")
    g.add_argument("--max-seq-len", type=int, default=SEQUENCE_LEN, help="tokens per training row")
    g = p.add_argument_group("data and batch")
    g.add_argument("--dataset", default="", help="dataset name under $PICOCHAT_HOME/data "
                   "(default: the one the tokenizer was trained on)")
    g.add_argument("--device-batch-size", type=int_or_auto, default=32,
                   help="rows per micro-batch per process, or 'auto' (largest that fits)")
    g.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all processes")
    g = p.add_argument_group("horizon (first one set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: derive)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: unused)")
    g.add_argument("--target-param-data-ratio", type=float, default=20.0,
                   help="tokens per parameter (Chinchilla: 20)")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the embedding (at width 768)")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the head (at width 768)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of LR warmup")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear LR warmdown")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end, as a fraction of the peak")
    g = p.add_argument_group("evaluation, sampling, checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="val bits/byte every N steps (-1: only at the end)")
    g.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens per val evaluation")
    g.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps (-1: only at the end)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this tag")
    g.add_argument("--resume-if-possible", action="store_true",
                   help="resume when this tag has a checkpoint, else start fresh (for re-runnable scripts)")
    g.add_argument("--model-tag", default="", help="checkpoint directory name (default: d<depth>)")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, default=42, help="seed of the weight init")
    add_device_args(g)
    g.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                   help="torch.compile the model (auto: on CUDA only)")
    return p


# -----------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.model_tag:
        check_model_tag(args.model_tag, "--model-tag")  # a name, never a path out of $PICOCHAT_HOME
    info, device = setup_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:
        return train(args, info, device, dtype)
    finally:
        shutdown_distributed()


def train(args, info, device, dtype):
    from picochat.tokenizer import default_dataset, get_tokenizer
    W = info.world_size
    tokenizer = get_tokenizer()
    args.dataset = args.dataset or default_dataset(tokenizer)
    token_bytes = tokenizer.token_bytes().to(device)
    T = args.max_seq_len
    if T < 8:
        raise PicochatError(f"--max-seq-len must be at least 8, got {T}")

    # --- model ---------------------------------------------------------------------------
    config = config_from_depth(args.depth, tokenizer.vocab_size, T, args.aspect_ratio, args.head_dim)
    seed_everything(args.seed)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights(seed=args.seed)
    num_params, flops_per_token = model.num_params(), model.flops_per_token()

    # --- batch arithmetic ----------------------------------------------------------------
    layout = batch_layout(args.total_batch_size, T, W, args.device_batch_size, model, device, dtype,
                          total_is_default=args.total_batch_size == build_parser().get_default("total_batch_size"))
    B_total, device_batch, grad_accum = layout.total_batch, layout.device_batch, layout.grad_accum
    num_streams = grad_accum * W

    # --- horizon -------------------------------------------------------------------------
    if args.num_iterations > 0:
        num_iterations, horizon = args.num_iterations, "--num-iterations"
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * B_total))
        horizon = f"--target-flops {args.target_flops:.3g}"
    elif args.target_param_data_ratio > 0:
        num_iterations = int(args.target_param_data_ratio * num_params // B_total)
        horizon = f"--target-param-data-ratio {args.target_param_data_ratio:g}"
    else:
        raise PicochatError("no horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
    if num_iterations < 1:
        raise PicochatError(f"the horizon ({horizon}) gives {num_iterations} steps; set --num-iterations")

    optimizer = model.setup_optimizer(args.embedding_lr, args.unembedding_lr, args.matrix_lr,
                                      args.weight_decay)
    args.model_tag = args.model_tag or f"d{args.depth}"  # saved resolved: later stages read it back
    model_tag = args.model_tag
    ckpt_root = checkpoint_dir("base", model_tag)
    metrics_path = ckpt_root / "metrics.jsonl"

    mem = estimate_memory_gib(model, device_batch, T, dtype, W)
    eval_mem = estimate_eval_memory_gib(model, device_batch, T, dtype, W)
    width = 24
    unrounded = args.depth * args.aspect_ratio
    rounding = (f" ({args.depth} × {args.aspect_ratio} = {unrounded} rounded up to a multiple of "
                f"{args.head_dim})") if unrounded != config.n_embd else ""
    print0(f"{'device':<{width}} {device} × {W} process(es), {torch.get_num_threads()} CPU thread(s) each, "
           f"compute dtype {str(dtype).replace('torch.', '')}")
    for note in layout.notes:
        print0(f"{'adjusted':<{width}} {note}")
    for key, value in [
        ("model", f"depth {config.n_layer}, width {config.n_embd}{rounding}, {config.n_head} heads of "
                  f"{config.head_dim}, vocab {config.vocab_size:,}, seq len {T}"),
        ("dataset", args.dataset),
        ("parameters", f"{num_params:,}"), ("FLOPs per token", f"{flops_per_token:.4e}"),
        ("total batch", f"{B_total:,} tokens = {device_batch} rows × {T} × {W} proc × {grad_accum} accum"),
        ("iterations", f"{num_iterations:,} (from {horizon})"),
        ("training tokens", f"{num_iterations * B_total:,} ({num_iterations * B_total / num_params:.2f} per param)"),
        ("training FLOPs", f"{flops_per_token * B_total * num_iterations:.4e}"),
        ("learning rates", ", ".join(f"{g['kind']} {g['lr']:.5g}" for g in optimizer.param_groups)),
        ("memory estimate", f"{mem:.2f} GiB per process for training, {eval_mem:.2f} GiB for evaluation"),
        ("checkpoints", str(ckpt_root)),
    ]:
        print0(f"{key:<{width}} {value}")

    # --- resume --------------------------------------------------------------------------
    check_shared_checkpoint_dir(ckpt_root, device)
    step, loop = 0, {"smooth_loss": 0.0, "total_time": 0.0, "min_val_bpb": float("inf"), "last_metrics": {}}
    loader_states = [None] * grad_accum
    resumed = load_for_resume(ckpt_root, args.resume, args.resume_if_possible, info.rank,
                              {"model_config": config.to_dict(), "world_size": W,
                               "device_batch_size": device_batch, "total_batch_size": B_total})
    was_resumed = resumed is not None
    if resumed:
        resume_step, meta, model_state, rank_state = resumed
        model.load_state_dict(model_state)
        optimizer.load_state_dict(rank_state["optimizer"])
        loader_states = rank_state["loaders"]
        torch.set_rng_state(rank_state["rng"])
        step, loop = resume_step, meta["loop"]
        del resumed, model_state, rank_state  # host copies; the model and optimizer hold their own
        num_iterations = meta["num_iterations"]
        if info.is_master:  # drop lines written after the checkpoint
            truncate_metrics(metrics_path, step)
        print0(f"resumed from step {step} of {num_iterations}")
        if step == num_iterations and run_is_complete(metrics_path, step):
            print0("this run is already complete; nothing to do")
            return 0
    elif info.is_master and metrics_path.exists():
        metrics_path.unlink()

    train_loaders = [PackingLoader(args.dataset, "train", tokenizer, device_batch, T,
                                   stream=info.rank + k * W, num_streams=num_streams, device=device,
                                   state=loader_states[k]) for k in range(grad_accum)]

    compile_model = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    trunk = torch.compile(model.trunk, dynamic=False) if compile_model else model.trunk
    print0(f"{'compile':<{width}} {'trunk and head chunks (torch.compile)' if compile_model else 'no (eager)'}")
    peak = peak_flops(device, dtype)

    def val_bpb() -> float:
        # Same streams as training, so the numbers do not depend on the number of processes.
        steps = max(1, args.eval_tokens // (device_batch * T * num_streams))
        loaders = [PackingLoader(args.dataset, "val", tokenizer, device_batch, T, stream=info.rank + k * W,
                                 num_streams=num_streams, buffer_docs=100, device=device)
                   for k in range(grad_accum)]
        batches = (batch for ld in loaders for batch in ld.one_pass(steps))
        model.eval()
        result = evaluate_bpb(lambda x, y: model(x, y, loss_reduction="none"), batches, token_bytes)
        model.train()
        return result

    def samples() -> None:
        if not info.is_master:
            return
        model.eval()
        engine = Engine(model, tokenizer)
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
            out = engine.generate_batch(ids, max_tokens=16, temperature=0.0)[0][0][len(ids):]
            print0(f"  {prompt!r} → {tokenizer.decode(out)!r}")
        model.train()

    def checkpoint(at_step: int, loader_states: list[dict]) -> None:
        meta = {"step": at_step, "model_tag": model_tag, "model_config": config.to_dict(), "user_config": vars(args),
                "compute_dtype": str(dtype).replace("torch.", ""), "world_size": W,
                "device_batch_size": device_batch, "total_batch_size": B_total, "max_seq_len": T,
                "num_iterations": num_iterations, "loop": loop}
        rank_state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                      "loaders": loader_states}
        save_checkpoint(ckpt_root, at_step, model.state_dict(), meta, rank_state,
                        keep_last=args.keep_last or None)
        print0(f"saved checkpoint step {at_step} → {ckpt_root}")

    def write_metrics(record: dict) -> None:
        if info.is_master:
            append_metrics(metrics_path, record)

    # --- the loop --------------------------------------------------------------------------
    if step == 0 and args.eval_every > 0:
        v = val_bpb()
        print0(f"step 0 | val bpb {v:.4f}")
        write_metrics({"step": 0, "val_bpb": v})
    model.train()
    finished_before_final_eval = was_resumed and step == num_iterations

    def saves_after(s: int) -> bool:
        return s == num_iterations or (args.save_every > 0 and s % args.save_every == 0)

    batches = [ld.next_batch() for ld in train_loaders] if step < num_iterations else []
    while step < num_iterations:
        t0 = time.perf_counter()
        lr_mult = lr_multiplier_by_step(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_schedules(optimizer, lr_mult, muon_momentum(step))
        loss_sum = torch.zeros((), device=device)
        for x, y in batches:
            loss = head_loss(trunk(x), model.lm_head.weight, y, compiled=compile_model)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        # Pack the next step's batches while the device is still busy with this one (nothing has
        # waited for it yet); a checkpoint after this step records the loaders as they were before.
        saved_loaders = [ld.state_dict() for ld in train_loaders] if saves_after(step + 1) else None
        if step + 1 < num_iterations:
            batches = [ld.next_batch() for ld in train_loaders]
        if W > 1:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / num_streams  # the step's one wait for the device (logging)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        if not math.isfinite(train_loss):
            raise PicochatError(f"loss became {train_loss} at step {step}; lower the learning rates or check the data")

        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss
        smooth = loop["smooth_loss"] / (1 - 0.9 ** step)
        if step > 1:  # the first step includes compilation and warm-up
            loop["total_time"] += dt
        tok_per_sec = B_total / dt
        mfu = flops_per_token * tok_per_sec / (peak * W)
        record = {"step": step, "loss": train_loss, "smooth_loss": smooth, "lr_mult": lr_mult, "dt": dt,
                  "tok_per_sec": tok_per_sec, "mfu": mfu, "tokens": step * B_total,
                  "time": loop["total_time"]}
        eta = (num_iterations - step) * loop["total_time"] / max(1, step - 1)
        print0(f"step {step:5d}/{num_iterations} | loss {train_loss:.4f} (smooth {smooth:.4f}) | "
               f"lr× {lr_mult:.2f} | {dt * 1000:.0f} ms | {tok_per_sec:,.0f} tok/s | MFU {100 * mfu:.1f}% | "
               f"ETA {eta / 60:.1f} min")

        last = step == num_iterations
        if last:  # the model is saved before any final evaluation, so an eval crash loses nothing
            loop["last_metrics"] = record
            checkpoint(step, saved_loaders)
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            record["val_bpb"] = val_bpb()
            loop["min_val_bpb"] = min(loop["min_val_bpb"], record["val_bpb"])
            print0(f"step {step} | val bpb {record['val_bpb']:.4f}")
        if last or (args.sample_every > 0 and step % args.sample_every == 0):
            samples()
        write_metrics(record)
        if not last and args.save_every > 0 and step % args.save_every == 0:
            checkpoint(step, saved_loaders)
    if finished_before_final_eval:
        # resumed from the final checkpoint (killed during the final eval): finish the eval
        record = dict(loop["last_metrics"])
        record["val_bpb"] = val_bpb()
        print0(f"step {step} | val bpb {record['val_bpb']:.4f}")
        samples()
        write_metrics(record)

    if device.type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print0(f"done: {step} steps, training time {loop['total_time'] / 60:.2f} min, "
           f"min val bpb {loop['min_val_bpb']:.4f}")
    return 0
