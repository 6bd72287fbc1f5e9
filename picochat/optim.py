"""
MuonAdamW: the one optimizer picochat trains with, in one process or across torch.distributed ranks.

Each param group says which rule updates it:

    opt = MuonAdamW([
        dict(kind="adamw", params=[wte.weight], lr=0.2),                          # embeddings
        dict(kind="adamw", params=[lm_head.weight], lr=0.004, weight_decay=0.0),  # unembedding
        dict(kind="muon", params=block_matrices, lr=0.02),                         # every 2-D block matrix
    ])
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

- adamw: exactly torch.optim.AdamW (decoupled weight decay, bias correction), always in fp32: a bf16
  param is upcast, updated and copied back, and its moments are kept in fp32.
- muon: Nesterov momentum, then the Newton-Schulz quintic turns the update into ~U S' V^T (S' in about
  [0.5, 1.5]), so every direction of the matrix moves by about the same amount. 2-D params only.
  Newton-Schulz runs in bf16 (`ns_dtype`) on a stack of all same-shape matrices at once;
  `newton_schulz_reference` is the slow one-matrix-at-a-time fp32 version the tests pin it against.
  Options of a muon group (each default is the seed rule, bit for bit), in the order they act:
      row_equilibrate=False   MuonEq: every row of the update scaled to the mean row norm first
      ortho="newton_schulz"   or "polar_express": 5 tuned polynomial steps, singular values nearer 1
      normuon=False, beta2=0.9   NorMuon: per-row (per-column if wide) second moment of the
                              orthogonalized update (state "second_moment") evens out the rows'
                              sizes, Frobenius norm kept
      weight_decay=0.0        cautious: decays only entries the update already pushes toward zero
  nanochat's 2026 recipe turns on all four, e.g. dict(kind="muon", params=..., lr=0.02,
  ortho="polar_express", normuon=True, weight_decay=0.28, row_equilibrate=True).
- Every group gets `initial_lr` at construction: the training loop sets lr = initial_lr * schedule
  each step, and sets a muon group's "momentum" (and, when asked, "weight_decay") from its schedules.

Distributed (torch.distributed initialized, world size W > 1; gloo on CPU, NCCL on GPU). No DDP:
every rank calls loss.backward() on its own micro-batch, then step() does the rest.
Each param has one owner rank (fixed, balanced by numel). step() has three phases:
  1. reduce(SUM) every gradient onto its owner (async, all launched at once); the owner divides by W;
  2. the owner updates its params, per group and per shape, as soon as their gradients arrive;
     only the owner holds that param's optimizer state (ZeRO-1 memory: sharded optimizer state;
     ZeRO-2 traffic: each gradient goes only to its owner, though every rank still allocates .grad);
  3. the owner broadcasts the updated param to every rank (async; all awaited at the end).
reduce + broadcast moves about the same bytes as reduce_scatter + all_gather, needs no padding or
dim-0 divisibility, and gloo and NCCL support both in every torch >= 2.4 (gloo in 2.13 also has
ReduceOp.AVG and reduce_scatter, and deprecates the *_tensor collectives for *_single ones).
With W = 1 every param is owned by rank 0 and nothing is sent: the same code path runs.
After step() the .grad of a param this rank does not own is scratch (reduce may reuse it): zero it.
Every rank must see the same set of params with .grad (it does when all run the same model).

state_dict() holds this rank's shard only (save one file per rank) plus the world size and owner
map; load_state_dict() refuses a shard from another world size, another rank or other params.

Tests: python -m pytest -q tests/test_optim.py
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from picochat.common import PicochatError


class OptimizerShardError(PicochatError, ValueError):
    """A saved optimizer shard does not fit this run (different world size or different params)."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -----------------------------------------------------------------------------
# Newton-Schulz orthogonalization

# Quintic coefficients from Keller Jordan's Muon (kellerjordan.github.io/posts/muon, 2024): chosen to
# push singular values in (0, 1] up fast; 5 steps land them in about [0.5, 1.5], not exactly at 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # keeps the Frobenius normalization finite for an all-zero gradient (same source)


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """~U S' V^T for every matrix in G of shape (..., rows, cols), all at once, computed in `dtype`."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side so A = X X^T is the small (min(rows,cols))^2 Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so after this every singular value is <= 1, where NS converges
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + NS_EPS)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def newton_schulz_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The same map, written out plainly: one matrix at a time, fp32. Slow; for tests."""
    a, b, c = NS_COEFFS
    rows, cols = G.shape[-2:]
    out = []
    for M in G.reshape(-1, rows, cols).float():
        X = M.T if rows > cols else M
        X = X / (torch.sqrt((X * X).sum()) + NS_EPS)
        for _ in range(steps):
            A = X @ X.T
            X = a * X + (b * A + c * (A @ A)) @ X
        out.append(X.T if rows > cols else X)
    return torch.stack(out).reshape(G.shape)


# -----------------------------------------------------------------------------
# Polar Express orthogonalization (Amsel et al., arXiv 2505.16932)

# One (a, b, c) per step, each the best odd quintic for the singular values the previous steps leave
# (the paper's 5-step schedule, as modded-nanogpt and nanochat use it): small singular values rise
# far faster than under NS_COEFFS, and 5 steps land them in about [0.85, 1.15] instead of [0.5, 1.15].
PE_COEFFS = (
    (8.1566, -22.4833, 15.8788),
    (4.0429, -2.8089, 0.5000),
    (3.8917, -2.7725, 0.5061),
    (3.2858, -2.3681, 0.4645),
    (2.3465, -1.7098, 0.4232),
)
# a 1% margin on the norm (the paper's safety factor) so rounding cannot leave a singular value above 1,
# where the polynomials are not designed to work; the eps keeps an all-zero update finite
PE_SAFETY, PE_EPS = 1.01, 1e-6


def polar_express(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """~U V^T for every matrix in G of shape (..., rows, cols), all at once, computed in `dtype`."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * PE_SAFETY + PE_EPS)
    if X.size(-2) > X.size(-1):  # tall: X^T X is the small Gram matrix, so multiply from the right
        for a, b, c in PE_COEFFS[:steps]:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * A @ A)
    else:
        for a, b, c in PE_COEFFS[:steps]:
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
    return X


def polar_express_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The same map, written out plainly: one matrix at a time, fp32, a tall matrix transposed to wide."""
    rows, cols = G.shape[-2:]
    out = []
    for M in G.reshape(-1, rows, cols).float():
        X = M.T if rows > cols else M
        X = X / (torch.sqrt((X * X).sum()) * PE_SAFETY + PE_EPS)
        for a, b, c in PE_COEFFS[:steps]:
            A = X @ X.T
            X = a * X + (b * A + c * (A @ A)) @ X
        out.append(X.T if rows > cols else X)
    return torch.stack(out).reshape(G.shape)


ORTHOGONALIZE = {"newton_schulz": newton_schulz, "polar_express": polar_express}


# -----------------------------------------------------------------------------
# MuonEq and NorMuon: the update's rows before and after orthogonalization

EQ_EPS = 1e-10  # a zero row stays zero instead of dividing by zero


def row_equilibrate(U: torch.Tensor) -> torch.Tensor:
    """MuonEq (nanochat, 2026-07: a "very slight" gain at d12 and d24): every row of each matrix in
    the stack (..., rows, cols) rescaled to that matrix's mean row norm, before orthogonalization."""
    norms = U.norm(dim=-1, keepdim=True)
    return U * (norms.mean(dim=-2, keepdim=True) / norms.clamp_min(EQ_EPS))


NORMUON_EPS = 1e-10  # in 1/sqrt(v + eps); tiny next to a real mean square (~1/max(rows, cols))


def normuon_axis(rows: int, cols: int) -> int:
    """The dim NorMuon averages over: -1 (columns; one value per row) for tall or square matrices,
    -2 (rows; one value per column) for wide ones."""
    return -1 if rows >= cols else -2


def normuon(U: torch.Tensor, v: torch.Tensor, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NorMuon (Li et al., arXiv 2510.05491) on a stack U of orthogonalized updates (..., rows, cols)
    with their second moments v (..., rows, 1) or (..., 1, cols): v becomes an EMA of the mean
    square of each row (column, if wide), each row is divided by sqrt(v + eps), and the result is
    rescaled to U's Frobenius norm, so only the balance between rows changes, not the step size.
    Returns (new update in fp32, new v); v itself is not modified."""
    U = U.float()
    mean_sq = U.square().mean(dim=normuon_axis(*U.shape[-2:]), keepdim=True)
    v = v.lerp(mean_sq, 1 - beta2)
    scaled = U * (v + NORMUON_EPS).rsqrt()
    norm, scaled_norm = U.norm(dim=(-2, -1), keepdim=True), scaled.norm(dim=(-2, -1), keepdim=True)
    return scaled * (norm / scaled_norm.clamp_min(NORMUON_EPS)), v


# -----------------------------------------------------------------------------
# The optimizer

# Seed-nanochat defaults per kind. AdamW betas/eps come from modded-nanogpt's speedrun settings (as
# used by nanochat); Muon lr/momentum/nesterov/ns_steps from Keller Jordan's Muon defaults. The other
# muon keys are off (the seed rule); beta2 0.9 is nanochat's NorMuon setting.
DEFAULTS = {
    "adamw": dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
    "muon": dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ortho="newton_schulz",
                 normuon=False, beta2=0.9, weight_decay=0.0, row_equilibrate=False),
}


class MuonAdamW(torch.optim.Optimizer):
    """AdamW for some groups, Muon for others; shards its state across ranks when distributed."""

    def __init__(self, param_groups, ns_dtype: torch.dtype = torch.bfloat16):
        self.ns_dtype = ns_dtype  # of NS and Polar Express; float32 where bf16 matmul is slow, or for exact tests
        self.world_size = dist.get_world_size() if is_distributed() else 1
        self.rank = dist.get_rank() if is_distributed() else 0
        self.owner: dict[torch.Tensor, int] = {}
        super().__init__(param_groups, defaults={})

    def add_param_group(self, group: dict) -> None:
        kind = group.get("kind")
        if kind not in DEFAULTS:
            raise ValueError(f"every param group needs kind='adamw' or kind='muon', got kind={kind!r}")
        for key, value in DEFAULTS[kind].items():
            group.setdefault(key, value)
        if "lr" not in group:
            raise ValueError("adamw param groups need an lr (there is no sensible default)")
        group.setdefault("initial_lr", group["lr"])
        super().add_param_group(group)
        if kind == "muon":
            if group["ortho"] not in ORTHOGONALIZE:
                raise ValueError(f"a muon group's ortho must be one of {sorted(ORTHOGONALIZE)}, "
                                 f"got {group['ortho']!r}")
            if group["ortho"] == "polar_express" and group["ns_steps"] > len(PE_COEFFS):
                raise ValueError(f"polar_express has coefficients for {len(PE_COEFFS)} steps, got "
                                 f"ns_steps={group['ns_steps']}; use ns_steps <= {len(PE_COEFFS)}")
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"muon only updates 2-D matrices, got a param of shape {tuple(p.shape)};"
                                     " put it in an adamw group")
        self._assign_owners()

    def _assign_owners(self) -> None:
        """Each param to the least-loaded rank, biggest first: deterministic, so every rank agrees."""
        params = [p for g in self.param_groups for p in g["params"]]
        order = sorted(range(len(params)), key=lambda i: (-params[i].numel(), i))
        load = [0] * self.world_size
        self.owner = {}
        for i in order:
            r = min(range(self.world_size), key=lambda r: (load[r], r))
            self.owner[params[i]] = r
            load[r] += params[i].numel()

    # --- step

    @torch.no_grad()
    def step(self):
        W = self.world_size
        # phase 1: every gradient travels to its owner; all launched now, awaited group by group below
        reduced = {}
        if W > 1:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        reduced[p] = dist.reduce(p.grad, dst=self.owner[p], op=dist.ReduceOp.SUM,
                                                 async_op=True)
        broadcasts = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            # adamw: one param at a time; muon: all same-shape matrices together (one batched NS)
            if group["kind"] == "adamw":
                batches = [[p] for p in params]
            else:
                shapes = list(dict.fromkeys(p.shape for p in params))  # first-seen order: same on all ranks
                batches = [[p for p in params if p.shape == s] for s in shapes]
            for batch in batches:
                for p in batch:
                    if p in reduced:
                        reduced[p].wait()
                mine = [p for p in batch if self.owner[p] == self.rank]
                if mine:
                    grads = [p.grad.float() / W for p in mine]  # a new fp32 tensor: p.grad is left as it was
                    if group["kind"] == "adamw":
                        self._adamw_update(mine[0], grads[0], group)
                    else:
                        self._muon_update(mine, grads, group)
                # phase 3: owners send the new values; the next batch computes meanwhile
                if W > 1:
                    broadcasts += [dist.broadcast(p, src=self.owner[p], async_op=True) for p in batch]
        for work in broadcasts:
            work.wait()

    def _adamw_update(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update, in fp32 (p32 aliases p when p is already fp32)."""
        state = self.state[p]
        if not state:
            state["step"] = 0  # a Python int: saved and restored exactly, no dtype casting on load
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        p32 = p.float()
        p32.mul_(1 - lr * wd)  # decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1 = 1 - beta1 ** t
        bias2 = 1 - beta2 ** t
        denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        p32.addcdiv_(m, denom, value=-lr / bias1)
        if p32 is not p:
            p.copy_(p32)

    def _muon_update(self, params: list, grads: list, group: dict) -> None:
        """Nesterov momentum per matrix; then, on the whole stack, [MuonEq], one batched
        orthogonalization, [NorMuon]; then the step with [cautious weight decay]."""
        mu = group["momentum"]
        updates = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - mu)
            updates.append(g.lerp(buf, mu) if group["nesterov"] else buf)
        U = torch.stack(updates)
        if group["row_equilibrate"]:
            U = row_equilibrate(U)
        U = ORTHOGONALIZE[group["ortho"]](U, group["ns_steps"], self.ns_dtype)
        rows, cols = params[0].shape
        if group["normuon"]:
            v_shape = (rows, 1) if normuon_axis(rows, cols) == -1 else (1, cols)
            for p in params:
                if "second_moment" not in self.state[p]:
                    self.state[p]["second_moment"] = torch.zeros(v_shape, dtype=torch.float32, device=p.device)
            U, v = normuon(U, torch.stack([self.state[p]["second_moment"] for p in params]), group["beta2"])
            for p, v_p in zip(params, v):
                self.state[p]["second_moment"].copy_(v_p)
        # NS output has spectral norm ~1 whatever the shape; a tall matrix (e.g. MLP c_fc, 4d x d) gets a
        # larger step so its per-element RMS update matches a square one (modded-nanogpt's Muon)
        lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
        wd = group["weight_decay"]
        for p, u in zip(params, U):
            p32 = p.float()
            u = u.float()
            if wd:
                # cautious weight decay (the mask of Cautious Optimizers, arXiv 2411.16085, applied to the
                # decay, as nanochat does): p <- p - lr*u - lr*wd*p*[u*p >= 0], with p from before this step;
                # an entry the update moves away from zero is not also pulled back toward it
                decay = p32 * (u * p32 >= 0)
                p32.add_(u, alpha=-lr)
                p32.add_(decay, alpha=-lr * wd)
            else:
                p32.add_(u, alpha=-lr)
            if p32 is not p:
                p.copy_(p32)

    # --- checkpointing

    def state_dict(self) -> dict:
        """This rank's shard of the state (only the params it owns), plus what is needed to check a load."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        sd["world_size"] = self.world_size
        sd["rank"] = self.rank
        sd["owners"] = [self.owner[p] for p in params]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a shard saved by state_dict() on the same rank of a run with the same world size.

        Written out rather than inherited: torch's loader casts state tensors to the param's dtype,
        which would round a bf16 param's fp32 moments and break bit-identical resume."""
        saved_w, saved_rank = state_dict.get("world_size", 1), state_dict.get("rank", 0)
        if saved_w != self.world_size:
            raise OptimizerShardError(
                f"optimizer state was saved with world size {saved_w}, now {self.world_size}; "
                "resume with the same number of processes")
        if saved_rank != self.rank:
            raise OptimizerShardError(
                f"rank {self.rank} was given the optimizer shard saved by rank {saved_rank}; "
                "load the file this rank saved")
        params = [p for g in self.param_groups for p in g["params"]]
        saved_sizes = [len(g["params"]) for g in state_dict["param_groups"]]
        if saved_sizes != [len(g["params"]) for g in self.param_groups] or \
                state_dict["owners"] != [self.owner[p] for p in params]:
            raise OptimizerShardError(
                f"optimizer state was saved for param groups of sizes {saved_sizes}, this optimizer has "
                f"{[len(g['params']) for g in self.param_groups]} (or a different owner map); "
                "resume with the same model and optimizer setup")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = defaultdict(dict)
        for index, saved in state_dict["state"].items():
            p = params[index]
            self.state[p] = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v
                             for k, v in saved.items()}
