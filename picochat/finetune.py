"""
What midtraining and SFT share: start from an earlier stage's checkpoint and train on a mixture of
conversations packed by ChatPacker, in the shared loop (picochat/loop.py: resume, checkpoints,
evaluation).

The stages differ only in their defaults and mixtures (stages/mid_train.py, stages/sft.py,
tasks/mixtures.py): midtraining learns the conversation format on every token; SFT learns only the
assistant's tokens. Each step's loss is the mean over every supervised token of the step, across
micro-batches and processes, so a micro-batch with no supervised token adds nothing instead of
dividing by zero.
"""
from __future__ import annotations

import math

import torch

from picochat.checkpoint import load_model
from picochat.cli import Parser, add_device_args, add_source_args, check_tags, int_or_auto
from picochat.common import (COMMAND_OF_STAGE, PicochatError, checkpoint_dir, dist_info, print0, resolve_dtype,
                             setup_device, shutdown_distributed)
from picochat.data.chat_loader import ChatPacker
from picochat.evals.bpb import evaluate_bpb
from picochat.loop import LoopSettings, Recipe, StepData, run_loop
from picochat.ops import head_loss
from picochat.training import batch_layout, lr_multiplier_by_progress


def build_parser(stage: str, description: str, defaults: dict) -> Parser:
    p = Parser(COMMAND_OF_STAGE[stage], description)
    p.add_argument("--mixture", default="full",
                   help="'full': the Hub datasets (nanochat's mixture); 'demo': offline data only; "
                        "or a .jsonl file of your own conversations")
    add_source_args(p, stage, defaults["source"])
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
    check_tags(args)
    info, device = setup_device(args.device)
    try:
        return train(stage, args, info, device, mixtures, mask_mode, defaults)
    finally:
        shutdown_distributed()


def train(stage, args, info, device, mixtures, mask_mode, defaults):
    from picochat.tokenizer import get_tokenizer
    W = info.world_size
    tokenizer = get_tokenizer()
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
    total_conversations = math.ceil(len(train_task) * args.num_epochs)
    optimizer = model.setup_optimizer(args.embedding_lr * args.init_lr_frac, args.unembedding_lr * args.init_lr_frac,
                                      args.matrix_lr * args.init_lr_frac, args.weight_decay,
                                      lr_frac=args.init_lr_frac)
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

    packers = [ChatPacker(train_task, tokenizer, device_batch, T, stream=info.rank + k * W, num_streams=num_streams,
                          mask_mode=mask_mode, device=device) for k in range(grad_accum)]
    recipe = Finetuning(stage, args, model, tokenizer, packers, val_task, mask_mode, total_conversations,
                        (device_batch, T), device)
    meta = {"stage": stage, "model_tag": model_tag, "model_config": config.to_dict(),
            "user_config": vars(args) | {"model_tag": model_tag}, "compute_dtype": str(dtype).replace("torch.", ""),
            "world_size": W, "device_batch_size": device_batch, "total_batch_size": total_batch, "max_seq_len": T,
            "source": {"stage": args.source, "tag": source_tag, "step": source_meta["step"]}}
    return run_loop(recipe, model, optimizer, LoopSettings.from_args(args), meta,
                    must_match=("model_config", "world_size", "device_batch_size", "total_batch_size"))


class Finetuning(Recipe):
    """Loss on the supervised tokens of packed conversations, normalized by their count over the
    whole step; the horizon is --num-iterations or --num-epochs of the mixture (progress = the
    fraction of conversations read, over every process), LR by progress; val bits per byte."""
    cheap_data = True  # packing: preparing one batch too many at the end costs nothing

    def __init__(self, stage, args, model, tokenizer, packers, val_task, mask_mode, total_conversations, rows, device):
        self.stage, self.args, self.model, self.tokenizer, self.packers = stage, args, model, tokenizer, packers
        self.val_task, self.mask_mode, self.total_conversations = val_task, mask_mode, total_conversations
        self.rows, self.device = rows, device  # rows: (rows per micro-batch, tokens per row)
        self.compiled = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
        self.trunk = torch.compile(model.trunk, dynamic=False) if self.compiled else model.trunk
        self.token_bytes = tokenizer.token_bytes().to(device)
        self.tokens_per_step = rows[0] * rows[1] * len(packers) * dist_info().world_size

    def next_step(self) -> StepData:
        batches = [p.next_batch() for p in self.packers]
        supervised = float(sum(p.last_supervised for p in self.packers))
        return StepData(batches, count=supervised,
                        sums={"conversations": float(sum(p.consumed for p in self.packers)), "supervised": supervised})

    def micro_loss(self, batch):
        x, y = batch
        return head_loss(self.trunk(x), self.model.lm_head.weight, y, reduction="sum", compiled=self.compiled)

    def data_state(self):
        return [p.state_dict() for p in self.packers]

    def load_data_state(self, state) -> None:
        for p, st in zip(self.packers, state):
            p.load_state_dict(st)

    def progress(self, step, sums) -> float:
        if self.args.num_iterations > 0:
            return step / self.args.num_iterations
        return sums["conversations"] / self.total_conversations

    def may_end_at(self, step) -> bool:
        return step >= self.args.num_iterations if self.args.num_iterations > 0 else True

    def lr_multiplier(self, step, progress) -> float:
        return lr_multiplier_by_progress(progress, self.args.warmdown_ratio)

    def step_record(self, sums, dt) -> dict:
        return {"tok_per_sec": self.tokens_per_step / dt, "supervised_tokens": int(sums["supervised"])}

    def evaluate(self, step) -> dict:
        a, (B, T) = self.args, self.rows
        info = dist_info()
        num_streams = len(self.packers) * info.world_size
        if len(self.val_task) < num_streams:
            return {"val_bpb": float("nan")}
        steps = max(1, a.eval_tokens // (B * T * num_streams))
        val = [ChatPacker(self.val_task, self.tokenizer, B, T, stream=info.rank + k * info.world_size,
                          num_streams=num_streams, mask_mode=self.mask_mode, device=self.device)
               for k in range(len(self.packers))]
        batches = (p.next_batch() for p in val for _ in range(steps) if p.consumed < p.stream_size)
        return {"val_bpb": evaluate_bpb(lambda x, y: self.model(x, y, loss_reduction="none"), batches,
                                        self.token_bytes)}
