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

import contextlib

import torch

from picochat.cli import Parser, add_device_args, int_or_auto
from picochat.common import (PicochatError, check_model_tag, checkpoint_dir, dist_info, peak_flops, print0,
                             resolve_dtype, seed_everything, setup_device, shutdown_distributed)
from picochat.data.loader import PackingLoader
from picochat.data.sources import read_manifest
from picochat.engine import Engine
from picochat.scheduler import generate_batch
from picochat.evals.bpb import evaluate_bpb
from picochat.model import ASPECT_RATIO, GPT, HEAD_DIM, SEQUENCE_LEN, config_from_depth
from picochat.ops import head_loss
from picochat.recipe import ADAM_GROUPS, MODEL_FLAGS, RECIPES, TRAINING, model_parts, short_window, warmup_steps
from picochat.recipe import horizon as recipe_horizon
from picochat.loop import LoopSettings, Recipe, StepData, run_loop
from picochat.training import (batch_layout, batch_lr_scale, cosine_weight_decay,
                               estimate_eval_memory_gib, estimate_memory_gib, lr_multiplier_by_step, muon_momentum,
                               muon_momentum_with_warmdown, scaled_weight_decay)

SAMPLE_PROMPTS = [  # the seed's fixed prompts, plus one for the Shakespeare demo corpus
    "The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
    "If 5*x + 3 = 13, then x is", "To be, or not to be,",
]


def build_parser() -> Parser:
    p = Parser("base_train", "Pretrain a base GPT on a shard dataset. Width, heads, horizon and "
               "learning rates are derived from --depth; each can be overridden. Flags whose default "
               "reads 'recipe' take the --recipe's value (picochat/recipe.py; docs/DESIGN.md#the-2026-recipe).")
    p.add_argument("--recipe", default="2026", choices=RECIPES,
                   help="seed: the 2025 recipe (full attention, plain residuals, Newton-Schulz Muon, "
                        "0.5M-token batch, 20 tokens/param); 2026: nanochat's leaderboard parts")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers (the one dial)")
    g.add_argument("--aspect-ratio", type=int, default=ASPECT_RATIO,
                   help="model width = depth × aspect ratio, rounded up to a multiple of --head-dim")
    g.add_argument("--head-dim", type=int, default=HEAD_DIM, help="attention head dimension")
    g.add_argument("--max-seq-len", type=int, default=SEQUENCE_LEN, help="tokens per training row")
    yes_no = dict(choices=["yes", "no"], default=None)
    g.add_argument("--window-pattern", default=None, help="per-layer attention, tiled: L full context, S the "
                   "last --short-window tokens; the last layer is always L (recipe: seed L, 2026 SSSL)")
    g.add_argument("--short-window", type=int, default=None, help="tokens an S layer sees (recipe: a quarter of --max-seq-len)")
    g.add_argument("--value-embeds", **yes_no, help="value embeddings on alternating layers (recipe)")
    g.add_argument("--lambdas", **yes_no, help="learnable per-layer residual and x0 scales (recipe)")
    g.add_argument("--smear", **yes_no, help="blend each token's embedding with its predecessor's (recipe)")
    g.add_argument("--backout", **yes_no, help="subtract part of the middle layer's residual before the head (recipe)")
    g.add_argument("--rope-base", type=float, default=None, help="RoPE base (recipe: seed 10,000, 2026 100,000)")
    g.add_argument("--qk-scale", type=float, default=None, help="q and k scale after QK-norm (recipe: 1.0 / 1.2)")
    g.add_argument("--init", choices=["seed", "2026"], default=None, help="weight init scheme (recipe)")
    g = p.add_argument_group("data and batch")
    g.add_argument("--dataset", default="", help="dataset name under $PICOCHAT_HOME/data "
                   "(default: the one the tokenizer was trained on)")
    g.add_argument("--device-batch-size", type=int_or_auto, default=32,
                   help="rows per micro-batch per process, or 'auto' (largest that fits)")
    g.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step, all "
                   "processes; -1: from the horizon, B ∝ D^0.383 around 2^19 at d12 (recipe: seed 524,288, 2026 -1)")
    g = p.add_argument_group("horizon (first one set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: derive)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: unused)")
    g.add_argument("--target-param-data-ratio", type=float, default=None,
                   help="tokens per parameter (recipe: seed 20 per parameter, 2026 12 per scaling parameter)")
    g.add_argument("--horizon-params", choices=["all", "scaling"], default=None, help="what the ratio counts: "
                   "all parameters, or the block matrices plus the head (recipe)")
    g = p.add_argument_group("optimization")
    g.add_argument("--embedding-lr", type=float, default=None, help="AdamW LR of the embedding at width 768 (recipe)")
    g.add_argument("--unembedding-lr", type=float, default=None, help="AdamW LR of the head at width 768 (recipe)")
    g.add_argument("--matrix-lr", type=float, default=None, help="Muon LR of the block matrices (recipe)")
    g.add_argument("--scalar-lr", type=float, default=None, help="AdamW LR of the lambdas (recipe)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (recipe)")
    g.add_argument("--muon-weight-decay", type=float, default=None, help="Muon's cautious weight decay, "
                   "cosine to 0; -1: 0.28·√(B/2^19)·(D_d12/D) (recipe: seed 0, 2026 -1)")
    g.add_argument("--ortho", choices=["newton_schulz", "polar_express"], default=None,
                   help="Muon's orthogonalization (recipe)")
    g.add_argument("--normuon", **yes_no, help="NorMuon's per-row variance normalization (recipe)")
    g.add_argument("--row-equilibrate", **yes_no, help="MuonEq: rows to equal norm before orthogonalizing (recipe)")
    g.add_argument("--batch-lr-scale", choices=["yes", "no", "auto"], default=None,
                   help="scale every LR by √(total batch / 2^19); auto: when the batch comes from the "
                        "horizon (--total-batch-size -1), where the rule was fitted (recipe: seed no, 2026 auto)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of LR warmup")
    g.add_argument("--warmup-steps", type=int, default=None, help="steps of LR warmup, used when --warmup-ratio "
                   "is 0; -1: 40, at most 2%% of the steps (recipe: seed 0, 2026 -1)")
    g.add_argument("--warmdown-ratio", type=float, default=None, help="fraction of steps of linear LR warmdown (recipe)")
    g.add_argument("--final-lr-frac", type=float, default=None, help="LR at the end, as a fraction of the peak (recipe)")
    g.add_argument("--momentum-schedule", choices=["seed", "2026"], default=None, help="Muon momentum: "
                   "0.85→0.95 over 300 steps, or 0.85→0.97 over 400 and →0.90 in the warmdown (recipe)")
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
    g.add_argument("--fp8", default="no", choices=["auto", "yes", "no"],
                   help="FP8 (tensorwise) block matmuls, picochat/fp8.py; auto: where the GPU has them "
                        "(H100/Ada), with a one-line note elsewhere; yes: refuse to run without")
    return p


def apply_recipe(args) -> set[str]:
    """Fill every flag left at None from the recipe (in place), so the run's user_config records
    the values it trained with. Returns the names of the recipe flags the user set."""
    explicit = {k for k in vars(args) if getattr(args, k) is not None}
    for flag, value in TRAINING[args.recipe].items():
        key = flag.replace("-", "_")
        if getattr(args, key) is None:
            setattr(args, key, value)
    parts = model_parts(args.recipe, args.max_seq_len)
    for flag, field in MODEL_FLAGS.items():
        key = flag.replace("-", "_")
        if getattr(args, key) is None:  # yes/no flags keep their words, so the report can print them
            value = parts[field]
            setattr(args, key, ("yes" if value else "no") if isinstance(value, bool) else value)
    if "S" in args.window_pattern.upper() and args.short_window < 1:
        args.short_window = short_window(args.max_seq_len)  # S layers asked for under the seed recipe
    return explicit


def model_config_parts(args) -> dict:
    """GPTConfig's 2026 fields from the (recipe-filled) flags."""
    parts = {}
    for flag, field in MODEL_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        parts[field] = value == "yes" if value in ("yes", "no") else value
    return parts


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
    explicit = apply_recipe(args)
    try:
        config = config_from_depth(args.depth, tokenizer.vocab_size, T, args.aspect_ratio, args.head_dim,
                                   **model_config_parts(args))
        # the horizon's tokens, the same recipe's d12 tokens (the reference of the batch and decay
        # rules) and the batch: one rule, shared with picochat.presets
        ratio = args.target_param_data_ratio
        target_tokens, ref_tokens, total_batch = recipe_horizon(config, ratio, args.horizon_params,
                                                                args.total_batch_size)
    except ValueError as e:
        raise PicochatError(str(e)) from None
    if args.muon_weight_decay < 0 and args.muon_weight_decay != -1:
        raise PicochatError(f"--muon-weight-decay must be >= 0 (or -1 for the rule), got {args.muon_weight_decay}")
    seed_everything(args.seed)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights(seed=args.seed)
    num_params, flops_per_token = model.num_params(), model.flops_per_token()

    # --- batch arithmetic ----------------------------------------------------------------
    layout = batch_layout(total_batch, T, W, args.device_batch_size, model, device, dtype,
                          total_is_default=args.total_batch_size == TRAINING[args.recipe]["total-batch-size"])
    B_total, device_batch, grad_accum = layout.total_batch, layout.device_batch, layout.grad_accum
    num_streams = grad_accum * W

    # --- horizon -------------------------------------------------------------------------
    if args.num_iterations > 0:
        num_iterations, horizon = args.num_iterations, "--num-iterations"
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * B_total))
        horizon = f"--target-flops {args.target_flops:.3g}"
    elif ratio > 0:
        num_iterations = int(target_tokens // B_total)
        horizon = f"--target-param-data-ratio {ratio:g} ({args.horizon_params} parameters)"
    else:
        raise PicochatError("no horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
    if num_iterations < 1:
        raise PicochatError(f"the horizon ({horizon}) gives {num_iterations} steps; set --num-iterations")

    # Far below 2^19 (a CPU run's 16K-token batch) the square-root rule cut every LR ~6x and
    # training stalled (docs/LOG.md): "auto" applies it only to batches the rule itself chose.
    scale_lr = args.batch_lr_scale == "yes" or (args.batch_lr_scale == "auto" and args.total_batch_size == -1)
    lr_scale = batch_lr_scale(B_total) if scale_lr else 1.0
    muon_wd = args.muon_weight_decay
    if muon_wd < 0:  # the T_epoch rule: B/(lr·wd·D) as at the d12 reference, for the LR actually used
        if ratio <= 0:
            raise PicochatError("--muon-weight-decay -1 (the rule) needs a positive --target-param-data-ratio")
        muon_wd = scaled_weight_decay(B_total, num_iterations * B_total, ref_tokens) * batch_lr_scale(B_total) / lr_scale
    adam = ADAM_GROUPS[args.recipe]
    if "weight_decay" in explicit:  # --weight-decay given: it rules the head and embedding, not the recipe
        adam = {name: {k: v for k, v in g.items() if k != "weight_decay"} for name, g in adam.items()}
    muon = dict(ortho=args.ortho, normuon=args.normuon == "yes", row_equilibrate=args.row_equilibrate == "yes",
                weight_decay=muon_wd)
    optimizer = model.setup_optimizer(args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.weight_decay,
                                      args.scalar_lr, lr_scale, adam, muon)
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
        ("recipe", f"{args.recipe}: windows {config.window_pattern}"
                   + (f" (S = {config.short_window})" if "S" in config.window_pattern else "")
                   + "".join(f", {n}" for n in ("value_embeds", "lambdas", "smear", "backout") if getattr(config, n))
                   + f", RoPE base {config.rope_base:g}, qk scale {config.qk_scale:g}, {config.init} init"),
        ("optimizer", f"Muon {args.ortho}{' + NorMuon' if args.normuon == 'yes' else ''}"
                      f"{' + MuonEq' if args.row_equilibrate == 'yes' else ''}, weight decay {muon_wd:.4g} "
                      f"(cautious, cosine to 0), LR × {lr_scale:.3g} for the batch, "
                      f"{warmup_steps(args.warmup_steps, num_iterations) if args.warmup_ratio == 0 else f'{args.warmup_ratio:g} of the'} "
                      f"warmup steps"),
        ("iterations", f"{num_iterations:,} (from {horizon})"),
        ("training tokens", f"{num_iterations * B_total:,} ({num_iterations * B_total / num_params:.2f} per param, "
                            f"{num_iterations * B_total / model.scaling_params():.2f} per scaling param)"),
        ("training FLOPs", f"{flops_per_token * B_total * num_iterations:.4e}"),
        ("learning rates", ", ".join(f"{g['kind']} {g['lr']:.5g}" for g in optimizer.param_groups)),
        ("memory estimate", f"{mem:.2f} GiB per process for training, {eval_mem:.2f} GiB for evaluation"),
        ("checkpoints", str(ckpt_root)),
    ]:
        print0(f"{key:<{width}} {value}")

    loaders = [PackingLoader(args.dataset, "train", tokenizer, device_batch, T, stream=info.rank + k * W,
                             num_streams=num_streams, device=device) for k in range(grad_accum)]
    if args.fp8 != "no":
        from picochat.fp8 import enable_fp8, fp8_support
        ok, why = fp8_support(device)
        if not ok and args.fp8 == "yes":
            raise PicochatError(f"--fp8 yes: {why}")
        print0(f"{'fp8':<{width}} " + (f"{enable_fp8(model)} block matmuls in FP8 (tensorwise)" if ok
                                     else f"off: {why}"))
    compile_model = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    print0(f"{'compile':<{width}} {'trunk and head chunks (torch.compile)' if compile_model else 'no (eager)'}")
    recipe = Pretraining(args, model, tokenizer, loaders, num_iterations, layout, T, compile_model, device, dtype)
    recipe.muon_weight_decay = muon_wd
    meta = {"model_tag": model_tag, "model_config": config.to_dict(), "user_config": vars(args),
            "compute_dtype": str(dtype).replace("torch.", ""), "world_size": W, "device_batch_size": device_batch,
            "total_batch_size": B_total, "max_seq_len": T, "num_iterations": num_iterations,
            "data_recipe": (read_manifest(args.dataset) or {}).get("recipe")}  # a rebuilt corpus is new data
    return run_loop(recipe, model, optimizer, LoopSettings.from_args(args), meta,
                    must_match=("model_config", "world_size", "device_batch_size", "total_batch_size", "data_recipe"))


def compute_dtype_matmuls(model):
    """Evaluation and sampling run in the compute dtype: FP8 switched off for the block (a no-op
    without FP8)."""
    if uses_fp8(model):
        from picochat.fp8 import fp8_disabled
        return fp8_disabled(model)
    return contextlib.nullcontext()


def uses_fp8(model) -> bool:
    return any(type(m).__name__ == "Float8Linear" for m in model.modules())


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
        return lr_multiplier_by_step(step, self.num_iterations, a.warmup_ratio, a.warmdown_ratio, a.final_lr_frac,
                                     warmup_steps=warmup_steps(a.warmup_steps, self.num_iterations)
                                     if a.warmup_ratio == 0 else None)

    def muon_schedule(self, step) -> tuple[float, float | None]:
        a, n = self.args, self.num_iterations
        momentum = (muon_momentum(step) if a.momentum_schedule == "seed"
                    else muon_momentum_with_warmdown(step, n, a.warmdown_ratio))
        wd = self.muon_weight_decay
        return momentum, (cosine_weight_decay(step, n, wd) if wd else None)

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
        with compute_dtype_matmuls(self.model):
            return {"val_bpb": evaluate_bpb(lambda x, y: self.model(x, y, loss_reduction="none"), batches,
                                            self.token_bytes)}

    def after_step(self, step, last) -> None:
        a = self.args
        if not (last or (a.sample_every > 0 and step % a.sample_every == 0)) or not dist_info().is_master:
            return
        self.model.eval()
        engine = Engine(self.model, self.tokenizer)
        with compute_dtype_matmuls(self.model):
            for prompt in SAMPLE_PROMPTS:
                ids = self.tokenizer.encode(prompt, prepend=self.tokenizer.bos_id)
                out = generate_batch(engine, ids, max_tokens=16, temperature=0.0)[0][0][len(ids):]
                print0(f"  {prompt!r} → {self.tokenizer.decode(out)!r}")
        self.model.train()
