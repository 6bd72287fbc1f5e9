"""
picochat's 2026 recipe side by side with nanochat HEAD's own scripts/base_train, on the same data,
the same tokenizer and the same machine, scored on the same held-out documents by the same code.

    git clone <nanochat> /work/nanochat-run       # any checkout of nanochat HEAD, outside this repo
    PICOCHAT_HOME=/work/abl python benchmarks/nanochat_side_by_side.py --nanochat /work/nanochat-run \\
        --depth 4 --flops-steps 100 --total-batch 16384
    PICOCHAT_HOME=/work/abl python benchmarks/nanochat_side_by_side.py --nanochat /work/nanochat-run \\
        --depth 8 --flops-steps 80 --total-batch 8192
    # throughput only (idle machine!): short runs of each, alternated, --rounds times
    PICOCHAT_HOME=/work/abl python benchmarks/nanochat_side_by_side.py --nanochat /work/nanochat-run \\
        --depth 4 --total-batch 16384 --no-train --rounds 3 --speed-steps 12

What it does:
1. Gives nanochat picochat's demo corpus and tokenizer, in nanochat's layout under --work
   ($NANOCHAT_BASE_DIR for its runs): base_data_climbmix/shard_NNNNN.parquet = the demo's train
   shards, then its val shard as the last one (nanochat's val split is its last shard);
   tokenizer/tokenizer.pkl = picochat's tiktoken Encoding pickled (nanochat's nine special tokens
   have the same names in the same order after the BPE ranks; checked by running nanochat's own
   get_tokenizer on it), tokenizer/token_bytes.pt = picochat's token_bytes().
2. FLOPs: the budget is what picochat's seed recipe spends in --flops-steps steps, counted by
   picochat's `GPT.flops_per_token` (6 per matmul weight + 12·H·D·keys seen per layer). Both
   2026-architecture models (picochat --recipe 2026 and nanochat HEAD: SSSL windows of a quarter
   context, value embeddings, lambdas, smear, backout) are counted with that same function on the
   same config, so they get the same number of steps. nanochat pads the vocabulary to a multiple
   of 64; the demo's 4,096 needs no padding (a padded vocabulary would be sliced off at import
   and is not counted; the script prints nanochat's own estimate beside picochat's).
3. Trains picochat (`picochat base_train --recipe 2026 --target-flops BUDGET`) and nanochat
   (`python -m scripts.base_train`, its defaults but for the shape flags: --depth, --max-seq-len,
   --device-batch-size, --total-batch-size, --num-iterations; NANOCHAT_DTYPE=bfloat16, since
   nanochat picks fp32 on a CPU by default; torch.compile on, as nanochat always does).
4. Imports nanochat's final checkpoint (`picochat import --stage base`) and evaluates both
   checkpoints with base_train's own end-of-run evaluation pieces (PackingLoader over the val
   split, one pass, evaluate_bpb) at the same rows, so both are scored on every held-out document
   once. nanochat's own val bpb (its loader, its evaluate_bpb, --eval-tokens of val) is printed
   for reference.
5. tok/s: short runs (--speed-steps) of both, alternated --rounds times, the median tok/s of the
   steps after the first --speed-warmup of each run (nanochat's first steps compile). The load
   average before each run is printed: numbers taken beside another busy process mean nothing.

nanochat's imports that a CPU run does not use (wandb) are stubbed by a one-line module on its
PYTHONPATH when the Python running it lacks them. Nothing of nanochat is copied into picochat.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, and how busy the CPUs were over the last second
    (nothing of ours runs then: a busy figure well above 0% is someone else's process; the load
    averages still carry this script's previous run for a minute or more)."""
    try:
        def times():
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            return sum(fields), fields[3] + fields[4]  # all, idle + iowait
        (t0, i0), _ = times(), time.sleep(1.0)
        t1, i1 = times()
        busy = 100 * (1 - (i1 - i0) / max(1, t1 - t0))
        return " ".join(Path("/proc/loadavg").read_text().split()[:3]) + f", CPUs {busy:.0f}% busy"
    except OSError:
        return "?"


def run_logged(cmd: list[str], log: Path, **kw) -> str:
    """Run cmd, tee-free: stdout+stderr to `log`, returned as text; raise on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, **kw)
    out = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{out[-3000:]}")
    return out


# -----------------------------------------------------------------------------
# 1. nanochat's data and tokenizer from picochat's

def prepare_nanochat_home(work: Path, dataset: str, nanochat: Path, python: str, env: dict) -> None:
    from picochat.data.shards import list_shards
    from picochat.tokenizer import get_tokenizer
    data = work / "base_data_climbmix"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    train, val = list_shards(dataset, "train"), list_shards(dataset, "val")
    if not train or len(val) != 1:
        raise SystemExit(f"dataset {dataset}: need train shards and one val shard, got {len(train)} and {len(val)}")
    for i, src in enumerate([*train, *val]):  # sorted names: the val shard is the last, as nanochat wants
        shutil.copyfile(src, data / f"shard_{i:05d}.parquet")
    tok = get_tokenizer()
    tdir = work / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    with open(tdir / "tokenizer.pkl", "wb") as f:
        pickle.dump(tok.enc, f)
    torch.save(tok.token_bytes(), tdir / "token_bytes.pt")
    # nanochat's own code reads it back: same special-token names and ids, same encoding.
    sample = "Hello, world! 12345 — Macbeth: Is this a dagger which I see before me?"
    check = ("import json; from nanochat.tokenizer import get_tokenizer, get_token_bytes, SPECIAL_TOKENS\n"
             "t = get_tokenizer(); print(json.dumps({'vocab': t.get_vocab_size(), "
             "'specials': {s: t.encode_special(s) for s in SPECIAL_TOKENS}, "
             f"'ids': t.encode({sample!r}), 'bytes': int(get_token_bytes().sum())}}))")
    out = subprocess.run([python, "-c", check], cwd=nanochat, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"nanochat cannot read the tokenizer:\n{out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = {"vocab": tok.vocab_size, "specials": tok.special_ids, "ids": tok.encode(sample),
            "bytes": int(tok.token_bytes().sum())}
    if got != want:
        raise SystemExit(f"nanochat reads another tokenizer: {got} != {want}")
    print(f"nanochat home {work}: {len(train)} train shards + 1 val shard of {dataset}, "
          f"tokenizer of {tok.vocab_size:,} tokens (specials {list(tok.special_ids)} at the same ids in both)")


def nanochat_env(work: Path, python: str) -> dict:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(work), "NANOCHAT_DTYPE": "bfloat16",
           "PYTHONUNBUFFERED": "1"}
    missing = subprocess.run([python, "-c", "import wandb"], capture_output=True).returncode != 0
    if missing:  # only `import wandb` at the top of base_train; --run dummy never calls it
        shim = work / "shim"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "wandb.py").write_text('"""Stub: nanochat imports wandb; its --run dummy never uses it."""\n')
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
    return env


# -----------------------------------------------------------------------------
# 2. FLOPs

def flops_per_token(recipe: str, depth: int, vocab: int, seq_len: int) -> int:
    from picochat.model import GPT, config_from_depth
    from picochat.recipe import model_parts
    with torch.device("meta"):
        return GPT(config_from_depth(depth, vocab, seq_len, **model_parts(recipe, seq_len))).flops_per_token()


# -----------------------------------------------------------------------------
# 3. the two trainings

def picochat_train(args, tag: str, horizon: list[str], log: Path, extra: list[str] = ()) -> dict:
    from picochat.common import checkpoint_dir
    cmd = [sys.executable, "-m", "picochat", "base_train", "--recipe", "2026", "--dataset", args.dataset,
           "--depth", str(args.depth), "--max-seq-len", str(args.seq_len),
           "--device-batch-size", str(args.device_batch), "--total-batch-size", str(args.total_batch),
           "--eval-every", "-1", "--eval-tokens", str(args.eval_tokens), "--sample-every", "-1",
           "--dtype", "bfloat16", "--seed", str(args.seed), "--model-tag", tag, *horizon, *extra]
    t0 = time.time()
    out = run_logged(cmd, log)
    records = [json.loads(line) for line in (checkpoint_dir("base", tag) / "metrics.jsonl").read_text().splitlines()]
    train = [r["tok_per_sec"] for r in records if "tok_per_sec" in r]
    vals = [r["val_bpb"] for r in records if "val_bpb" in r]
    return {"cmd": cmd, "steps": len(train), "tok_per_sec": train, "own_val_bpb": vals[-1] if vals else None,
            "flops": float(re.search(r"training FLOPs\s+([\d.e+]+)", out).group(1)), "wall_s": time.time() - t0}


def picochat_run_record(tag: str, args, fpt: int) -> dict:
    """picochat_train's record of a finished earlier run, from its metrics and meta; refuses a
    run of another recipe or shape."""
    from picochat.checkpoint import latest_step, load_meta
    from picochat.common import checkpoint_dir
    root = checkpoint_dir("base", tag)
    meta = load_meta(root, latest_step(root))
    u = meta["user_config"]
    want = {"recipe": "2026", "depth": args.depth, "max_seq_len": args.seq_len, "total_batch_size": args.total_batch,
            "dataset": args.dataset, "dtype": "bfloat16"}
    got = {k: u.get(k) for k in want}
    if got != want:
        raise SystemExit(f"--picochat-tag {tag}: {got} is not {want}")
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    train = [r["tok_per_sec"] for r in records if "tok_per_sec" in r]
    vals = [r["val_bpb"] for r in records if "val_bpb" in r]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in u.items() if v not in (None, "", False)
                     and k in ("recipe", "depth", "max_seq_len", "total_batch_size", "device_batch_size",
                               "target_flops", "num_iterations", "warmup_steps", "seed", "dtype"))
    return {"cmd": ["picochat", "base_train", flags], "steps": len(train), "tok_per_sec": train,
            "own_val_bpb": vals[-1] if vals else None, "flops": fpt * args.total_batch * len(train),
            "wall_s": records[-1].get("time", float("nan"))}


def nanochat_train(args, tag: str, steps: int, eval_every: int, log: Path, env: dict) -> dict:
    cmd = [args.nanochat_python, "-m", "scripts.base_train", "--device-type", "cpu", "--depth", str(args.depth),
           "--max-seq-len", str(args.seq_len), "--device-batch-size", str(args.device_batch),
           "--total-batch-size", str(args.total_batch), "--num-iterations", str(steps),
           "--eval-every", str(eval_every), "--eval-tokens", str(args.eval_tokens),
           "--core-metric-every", "-1", "--sample-every", "-1", "--model-tag", tag]
    t0 = time.time()
    out = run_logged(cmd, log, cwd=args.nanochat, env=env)
    tps = [int(m.group(1).replace(",", "")) for m in re.finditer(r"^step \d+/\d+ .*tok/sec: ([\d,]+)", out, re.M)]
    vals = [float(v) for v in re.findall(r"Validation bpb: ([\d.]+)", out)]
    fpt = float(re.search(r"Estimated FLOPs per token: ([\d.e+]+)", out).group(1))
    dtype = re.search(r"COMPUTE_DTYPE: (.*)", out).group(1).strip()
    return {"cmd": cmd, "steps": len(tps), "tok_per_sec": tps, "own_val_bpb": vals[-1] if vals else None,
            "flops_per_token": fpt, "dtype": dtype, "wall_s": time.time() - t0,
            "ckpt": Path(env["NANOCHAT_BASE_DIR"]) / "base_checkpoints" / tag}


# -----------------------------------------------------------------------------
# 4. import and the shared evaluation

def import_nanochat(ckpt: Path, tokenizer_dir: Path, tag: str, log: Path) -> None:
    run_logged([sys.executable, "-m", "picochat", "import", str(ckpt), "--stage", "base", "--model-tag", tag,
                "--tokenizer", str(tokenizer_dir), "--force"], log)


def val_bpb(tag: str, dataset: str, device_batch: int, seq_len: int, eval_tokens: int) -> tuple[float, int]:
    """base_train's end-of-run evaluation (Pretraining.evaluate, one process, one stream): the val
    split packed into rows of seq_len, one pass, bits per byte. Returns (bpb, documents scored)."""
    from picochat.checkpoint import load_model
    from picochat.data.loader import PackingLoader
    from picochat.evals.bpb import evaluate_bpb
    from picochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    model, _ = load_model("base", tag, torch.device("cpu"), compute_dtype=torch.bfloat16, tokenizer=tok)
    loader = PackingLoader(dataset, "val", tok, device_batch, seq_len, stream=0, num_streams=1, buffer_docs=100)
    steps = max(1, eval_tokens // (device_batch * seq_len))
    bpb = evaluate_bpb(lambda x, y: model(x, y, loss_reduction="none"), loader.one_pass(steps), tok.token_bytes())
    return bpb, loader.docs_packed


def median_after(values: list[float], warmup: int) -> float:
    rest = values[warmup:] or values[-1:]
    return statistics.median(rest) if rest else float("nan")


# -----------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanochat", type=Path, required=True, help="a checkout of nanochat (outside this repo)")
    p.add_argument("--nanochat-python", default=sys.executable, help="the Python that runs nanochat")
    p.add_argument("--work", type=Path, default=None,
                   help="nanochat's base dir (NANOCHAT_BASE_DIR) for these runs (default: $PICOCHAT_HOME/nanochat_sbs)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--flops-steps", type=int, default=100, help="the budget: FLOPs of this many seed-recipe steps")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--total-batch", type=int, default=16384, help="tokens per step, both")
    p.add_argument("--device-batch", type=int, default=0, help="rows per micro-batch (default: total/seq, at most 32)")
    p.add_argument("--eval-tokens", type=int, default=163840, help="val tokens (the demo's val split is ~140K: all of it)")
    p.add_argument("--dataset", default="demo")
    p.add_argument("--seed", type=int, default=42, help="picochat's init seed (nanochat seeds its own)")
    p.add_argument("--no-train", action="store_true", help="skip the equal-FLOPs trainings (tok/s only)")
    p.add_argument("--picochat-tag", default="", help="score this finished picochat 2026 run (same depth, "
                   "batch, rows, data) instead of training one")
    p.add_argument("--rounds", type=int, default=2, help="tok/s rounds, each a short run of both (0: none)")
    p.add_argument("--speed-steps", type=int, default=12, help="steps per tok/s run")
    p.add_argument("--speed-warmup", type=int, default=4, help="steps of each tok/s run left out (compile, warm-up)")
    p.add_argument("--out", default="", help="append the results as one JSON line to this file")
    args = p.parse_args()
    args.nanochat = args.nanochat.resolve()
    args.device_batch = args.device_batch or min(32, args.total_batch // args.seq_len)

    from picochat.common import picochat_home
    from picochat.tokenizer import get_tokenizer
    home = picochat_home()
    work = (args.work or home / "nanochat_sbs").resolve()
    logs = work / "logs"
    stamp = time.strftime("%H%M%S")
    nc_commit = subprocess.run(["git", "-C", str(args.nanochat), "rev-parse", "--short", "HEAD"],
                               capture_output=True, text=True).stdout.strip() or "?"
    env = nanochat_env(work, args.nanochat_python)
    prepare_nanochat_home(work, args.dataset, args.nanochat, args.nanochat_python, env)

    vocab = get_tokenizer().vocab_size
    fpt_seed = flops_per_token("seed", args.depth, vocab, args.seq_len)
    fpt_2026 = flops_per_token("2026", args.depth, vocab, args.seq_len)
    budget = fpt_seed * args.total_batch * args.flops_steps
    nc_steps = round(budget / (fpt_2026 * args.total_batch))
    print(f"d{args.depth}, {args.seq_len}-token rows, {args.total_batch:,} tokens/step ({args.device_batch} rows/micro-batch), "
          f"bf16; budget {budget:.4e} FLOPs = {args.flops_steps} seed steps ({fpt_seed:.4e} FLOPs/token); "
          f"2026 architecture {fpt_2026:.4e} FLOPs/token (picochat's GPT.flops_per_token) -> {nc_steps} steps; "
          f"nanochat {nc_commit}; load {loadavg()}", flush=True)

    result = {"depth": args.depth, "total_batch": args.total_batch, "seq_len": args.seq_len,
              "budget": budget, "nanochat_commit": nc_commit}
    if not args.no_train:
        pc_tag, nc_tag = f"sbs-{stamp}-picochat-d{args.depth}", f"sbs-{stamp}-nanochat-d{args.depth}"
        if args.picochat_tag:  # an earlier run of the same recipe and shape, e.g. recipe_ablation's
            pc_tag = args.picochat_tag
            pc = picochat_run_record(pc_tag, args, fpt_2026)
            print(f"picochat 2026: reusing checkpoint {pc_tag} (its command: {' '.join(pc['cmd'])})", flush=True)
        else:
            print(f"picochat 2026 training (load {loadavg()}) ...", flush=True)
            pc = picochat_train(args, pc_tag, ["--target-flops", f"{budget:.6e}"], logs / f"{pc_tag}.log")
        print(f"  {pc['steps']} steps, {pc['flops']:.4e} FLOPs, own val bpb {pc['own_val_bpb']:.4f}, {pc['wall_s']:.0f}s", flush=True)
        print(f"nanochat training, {nc_steps} steps (load {loadavg()}) ...", flush=True)
        nc = nanochat_train(args, nc_tag, nc_steps, nc_steps, logs / f"{nc_tag}.log", env)
        print(f"  {nc['steps']} steps, its FLOPs/token {nc['flops_per_token']:.4e} (picochat's count {fpt_2026:.4e}), "
              f"compute dtype {nc['dtype']}, own val bpb {nc['own_val_bpb']}, {nc['wall_s']:.0f}s", flush=True)
        import_nanochat(nc["ckpt"], work / "tokenizer", nc_tag, logs / f"{nc_tag}-import.log")
        pc_bpb, pc_docs = val_bpb(pc_tag, args.dataset, args.device_batch, args.seq_len, args.eval_tokens)
        nc_bpb, nc_docs = val_bpb(nc_tag, args.dataset, args.device_batch, args.seq_len, args.eval_tokens)
        assert pc_docs == nc_docs
        print(f"  val bpb on the same {pc_docs} held-out documents, same code: picochat {pc_bpb:.4f}, "
              f"nanochat {nc_bpb:.4f}", flush=True)
        result.update(picochat_bpb=pc_bpb, nanochat_bpb=nc_bpb, picochat_own_bpb=pc["own_val_bpb"],
                      nanochat_own_bpb=nc["own_val_bpb"], picochat_steps=pc["steps"], nanochat_steps=nc["steps"],
                      picochat_flops=pc["flops"], nanochat_flops=fpt_2026 * args.total_batch * nc["steps"],
                      nanochat_flops_own_count=nc["flops_per_token"] * args.total_batch * nc["steps"],
                      val_docs=pc_docs, picochat_train_tok_s=median_after(pc["tok_per_sec"], 1),
                      nanochat_train_tok_s=median_after(nc["tok_per_sec"], args.speed_warmup),
                      picochat_wall_s=pc["wall_s"], nanochat_wall_s=nc["wall_s"],
                      picochat_cmd=" ".join(pc["cmd"]), nanochat_cmd=" ".join(nc["cmd"]))

    speed = []
    for r in range(args.rounds):
        for who in ("picochat", "nanochat"):
            load = loadavg()
            tag = f"sbs-{stamp}-speed{r}-{who}-d{args.depth}"
            if who == "picochat":
                run = picochat_train(args, tag, ["--num-iterations", str(args.speed_steps)], logs / f"{tag}.log",
                                     ["--eval-tokens", str(args.device_batch * args.seq_len)])
            else:
                run = nanochat_train(args, tag, args.speed_steps, -1, logs / f"{tag}.log", env)
            tps = median_after(run["tok_per_sec"], args.speed_warmup)
            speed.append({"round": r, "who": who, "tok_per_sec": tps, "load_before": load, "steps": run["tok_per_sec"]})
            print(f"  tok/s round {r} {who:<9} {tps:,.0f} (load before {load}; per step "
                  f"{', '.join(f'{t:,.0f}' for t in run['tok_per_sec'])})", flush=True)
    if speed:
        pc_s = statistics.median(s["tok_per_sec"] for s in speed if s["who"] == "picochat")
        nc_s = statistics.median(s["tok_per_sec"] for s in speed if s["who"] == "nanochat")
        result.update(speed=speed, picochat_tok_s=pc_s, nanochat_tok_s=nc_s)

    # --- the table
    print()
    print(f"d{args.depth}, {args.total_batch:,} tokens/step, {args.seq_len}-token rows, bf16, demo corpus, "
          f"FLOPs budget {budget:.3e} ({args.flops_steps} seed steps); nanochat {nc_commit}")
    print()
    print("| | picochat --recipe 2026 | nanochat HEAD base_train | picochat / nanochat |")
    print("|---|---:|---:|---:|")
    if "picochat_bpb" in result:
        r = result
        print(f"| val bpb, same {r['val_docs']} held-out docs, same code | **{r['picochat_bpb']:.4f}** | "
              f"**{r['nanochat_bpb']:.4f}** | {100 * (r['picochat_bpb'] / r['nanochat_bpb'] - 1):+.2f}% |")
        print(f"| val bpb, each one's own end-of-run eval | {r['picochat_own_bpb']:.4f} | {r['nanochat_own_bpb']:.4f} | |")
        print(f"| steps | {r['picochat_steps']} | {r['nanochat_steps']} | |")
        print(f"| training FLOPs (picochat's count) | {r['picochat_flops']:.4e} | {r['nanochat_flops']:.4e} | "
              f"{r['picochat_flops'] / r['nanochat_flops']:.3f} |")
        print(f"| tok/s during these runs (median) | {r['picochat_train_tok_s']:,.0f} | {r['nanochat_train_tok_s']:,.0f} | "
              f"{r['picochat_train_tok_s'] / r['nanochat_train_tok_s']:.2f}x |")
        print(f"| wall time of the run | {r['picochat_wall_s']:.0f} s | {r['nanochat_wall_s']:.0f} s | |")
    if speed:
        print(f"| tok/s, {args.rounds} alternated rounds of {args.speed_steps} steps (median) | {pc_s:,.0f} | {nc_s:,.0f} | "
              f"**{pc_s / nc_s:.2f}x** |")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
