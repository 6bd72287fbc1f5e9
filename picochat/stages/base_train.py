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

import torch

from picochat.cli import Parser, add_device_args, int_or_auto
from picochat.common import (PicochatError, check_model_tag, checkpoint_dir, dist_info, peak_flops, print0,
                             resolve_dtype, seed_everything, setup_device, shutdown_distributed)
from picochat.data.loader import PackingLoader
from picochat.data.sources import read_manifest
from picochat.engine import Engine
from picochat.evals.bpb import evaluate_bpb
from picochat.model import ASPECT_RATIO, GPT, HEAD_DIM, SEQUENCE_LEN, config_from_depth, head_loss
from picochat.loop import LoopSettings, Recipe, StepData, run_loop
from picochat.training import batch_layout, estimate_eval_memory_gib, estimate_memory_gib, lr_multiplier_by_step

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

    loaders = [PackingLoader(args.dataset, "train", tokenizer, device_batch, T, stream=info.rank + k * W,
                             num_streams=num_streams, device=device) for k in range(grad_accum)]
    compile_model = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    print0(f"{'compile':<{width}} {'trunk and head chunks (torch.compile)' if compile_model else 'no (eager)'}")
    recipe = Pretraining(args, model, tokenizer, loaders, num_iterations, layout, T, compile_model, device, dtype)
    meta = {"model_tag": model_tag, "model_config": config.to_dict(), "user_config": vars(args),
            "compute_dtype": str(dtype).replace("torch.", ""), "world_size": W, "device_batch_size": device_batch,
            "total_batch_size": B_total, "max_seq_len": T, "num_iterations": num_iterations,
            "data_recipe": (read_manifest(args.dataset) or {}).get("recipe")}  # a rebuilt corpus is new data
    return run_loop(recipe, model, optimizer, LoopSettings.from_args(args), meta,
                    must_match=("model_config", "world_size", "device_batch_size", "total_batch_size", "data_recipe"))


class Pretraining(Recipe):
    """Next-token loss on packed documents, a fixed number of steps, LR by step; val bits per byte
    (also before the first step) and, when due, greedy samples of the fixed prompts."""
    stage = "base"
    eval_at_start = True
    untimed_first_step = True

    def __init__(self, args, model, tokenizer, loaders, num_iterations, layout, seq_len, compile_model, device, dtype):
        self.args, self.model, self.tokenizer, self.loaders = args, model, tokenizer, loaders
        self.num_iterations, self.layout, self.seq_len = num_iterations, layout, seq_len
        self.total_batch, self.compiled, self.device = layout.total_batch, compile_model, device
        self.trunk = torch.compile(model.trunk, dynamic=False) if compile_model else model.trunk
        self.token_bytes = tokenizer.token_bytes().to(device)
        self.flops_per_token = model.flops_per_token()
        self.peak = peak_flops(device, dtype) * dist_info().world_size

    def next_step(self) -> StepData:
        batches = [ld.next_batch() for ld in self.loaders]
        return StepData(batches, count=sum(x.numel() for x, _ in batches))

    def micro_loss(self, batch):
        x, y = batch
        return head_loss(self.trunk(x), self.model.lm_head.weight, y, reduction="sum", compiled=self.compiled)

    def data_state(self):
        return [ld.state_dict() for ld in self.loaders]

    def load_data_state(self, state) -> None:
        for ld, st in zip(self.loaders, state):
            ld.load_state_dict(st)

    def on_resume(self, meta: dict) -> None:
        self.num_iterations = meta["num_iterations"]

    def progress(self, step, sums) -> float:
        return step / self.num_iterations

    def may_end_at(self, step) -> bool:
        return step >= self.num_iterations

    def lr_multiplier(self, step, progress) -> float:
        a = self.args
        return lr_multiplier_by_step(step, self.num_iterations, a.warmup_ratio, a.warmdown_ratio, a.final_lr_frac)

    def step_record(self, sums, dt) -> dict:
        tok_per_sec = self.total_batch / dt
        return {"tok_per_sec": tok_per_sec, "mfu": self.flops_per_token * tok_per_sec / self.peak}

    def describe(self, record) -> str:
        return f"{record['tok_per_sec']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%"

    def evaluate(self, step) -> dict:
        # Same streams as training, so the numbers do not depend on the number of processes.
        a, B, T = self.args, self.layout.device_batch, self.seq_len
        info = dist_info()
        num_streams = self.layout.grad_accum * info.world_size
        steps = max(1, a.eval_tokens // (B * T * num_streams))
        loaders = [PackingLoader(a.dataset, "val", self.tokenizer, B, T, stream=info.rank + k * info.world_size,
                                 num_streams=num_streams, buffer_docs=100, device=self.device)
                   for k in range(self.layout.grad_accum)]
        batches = (batch for ld in loaders for batch in ld.one_pass(steps))
        return {"val_bpb": evaluate_bpb(lambda x, y: self.model(x, y, loss_reduction="none"), batches,
                                        self.token_bytes)}

    def after_step(self, step, last) -> None:
        a = self.args
        if not (last or (a.sample_every > 0 and step % a.sample_every == 0)) or not dist_info().is_master:
            return
        self.model.eval()
        engine = Engine(self.model, self.tokenizer)
        for prompt in SAMPLE_PROMPTS:
            ids = self.tokenizer.encode(prompt, prepend=self.tokenizer.bos_id)
            out = engine.generate_batch(ids, max_tokens=16, temperature=0.0)[0][0][len(ids):]
            print0(f"  {prompt!r} → {self.tokenizer.decode(out)!r}")
        self.model.train()
