"""
`picochat export`: a checkpoint as a folder transformers loads offline.

    picochat export                                  # the only SFT model, latest step
    picochat export --source base --model-tag d20 --out ./d20-base

The folder: config.json, model.safetensors (fp32), tokenizer.json + tokenizer_config.json +
special_tokens_map.json (fast tokenizer, chat template), generation_config.json (stops at
<|assistant_end|>), picochat.json (where it came from, for `picochat import`) and README.md (a model
card written from the checkpoint's records). A model of the seed architecture is transformers' own
"nanochat" model type (no remote code); a model with any 2026 part (windows, value embeddings,
lambdas, smear, backout, another RoPE base or q·k scale) also gets configuration_picochat.py and
modeling_picochat.py, which transformers runs only with trust_remote_code=True. The tokenizer is
the one beside the checkpoint (an import leaves one there), else the shared $PICOCHAT_HOME/tokenizer.
Everything is written to a temporary folder beside the output and renamed into place at the end.
See docs/EXPORT.md.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from pathlib import Path

from picochat.checkpoint import latest_step, list_steps, load_checkpoint, load_meta, resolve_model_dir
from picochat.cli import Parser
from picochat.common import COMMAND_OF_STAGE, TRAINING_STAGES, PicochatError, checkpoint_dir, picochat_home
from picochat.interop import check_config, check_state_dict, expected_shapes, hf, swap_into_place
from picochat.model import GPTConfig
from picochat.report import read_log, run_log_path
from picochat.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer, get_tokenizer

SOURCES = tuple(TRAINING_STAGES)
PROVENANCE_FILE = "picochat.json"
PROVENANCE_FORMAT = "picochat-export/1"
STAGE_NAMES = {name: f"{stage.title.lower()} ({stage.command})" for name, stage in TRAINING_STAGES.items()}


def build_parser() -> Parser:
    p = Parser("export", "Write a checkpoint as a folder that transformers loads offline (model, "
                         "tokenizer, chat template, model card).")
    p.add_argument("--source", default="sft", choices=SOURCES, help="which stage's checkpoint")
    p.add_argument("--model-tag", default="", help="checkpoint tag (default: the only one there)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: $PICOCHAT_HOME/export/<tag>-<source>-step<N>)")
    p.add_argument("--force", action="store_true", help="replace the output folder (an earlier export) if it exists")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = resolve_model_dir(args.source, args.model_tag or None)
    step = latest_step(root) if args.step < 0 else args.step
    if step not in list_steps(root):
        raise PicochatError(f"no step {step} in {root}; steps there: {', '.join(map(str, list_steps(root)))}")
    state, meta, _ = load_checkpoint(root, step, "cpu")
    config = checkpoint_config(meta, f"{root.name} step {step}")
    check_state_dict(state, config, f"checkpoint {root.name} step {step}")
    own = root / "tokenizer"  # an imported model's own tokenizer, which the shared one may not be
    tokenizer = Tokenizer.load(own) if (own / TOKENIZER_FILE).is_file() else get_tokenizer()
    if list(tokenizer.special_ids) != SPECIAL_TOKENS:
        raise PicochatError(f"the tokenizer's special tokens {list(tokenizer.special_ids)} are not picochat's nine")
    if tokenizer.vocab_size != config.vocab_size:
        raise PicochatError(f"the model has vocab {config.vocab_size} but the tokenizer {tokenizer.vocab_size}; "
                            f"was the tokenizer retrained after training?")
    out = output_folder(args.out or picochat_home() / "export" / f"{root.name}-{args.source}-step{step:06d}",
                        args.force)

    # Everything that can be refused is built before the first byte is written.
    native = config.is_seed()  # transformers' NanoChat class holds it; else our own modeling file
    files = {
        "config.json": hf.hf_config(config, tokenizer) if native else hf.remote_config(config, tokenizer),
        "generation_config.json": hf.generation_config(tokenizer),
        "tokenizer_config.json": hf.tokenizer_config(tokenizer, config.sequence_len),
        "special_tokens_map.json": {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
                                    "pad_token": "<|assistant_end|>"},
        PROVENANCE_FILE: {"format": PROVENANCE_FORMAT, "stage": args.source, "model_tag": root.name,
                          "step": step, "model_config": config.to_dict()},
    }
    texts = {"tokenizer.json": hf.build_tokenizer_json(tokenizer),
             "README.md": model_card(args.source, root, step, meta, config)}
    try:
        with staged_folder(out) as tmp:
            for name, data in files.items():
                (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
            for name, text in texts.items():
                (tmp / name).write_text(text)
            for name in () if native else hf.REMOTE_FILES:
                shutil.copyfile(hf.REMOTE_CODE / name, tmp / name)
            hf.save_weights(state, tmp / hf.WEIGHTS_FILE, native)
            # safetensors creates its file owner-only; give it the mode every other file got
            os.chmod(tmp / hf.WEIGHTS_FILE, (tmp / "config.json").stat().st_mode & 0o777)
    except OSError as e:
        raise PicochatError(f"could not write {out} ({e})") from None
    print(f"exported {args.source} model {root.name} step {step} → {out}")
    if not native:
        print(f"note: its {', '.join(parts_of(config))} are beyond transformers' NanoChat class, so the folder "
              f"carries its own modeling file: load it with "
              f"AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    return 0


def parts_of(config: GPTConfig) -> list[str]:
    """The 2026 parts a model has, in words (for the note and the model card)."""
    defaults = GPTConfig()
    windows = any(w is not None for w in config.layer_windows())
    named = [("sliding windows", windows), (f"window pattern {config.window_pattern}", not windows and
                                            config.window_pattern != defaults.window_pattern),
             ("value embeddings", config.value_embeds), ("residual lambdas", config.lambdas),
             ("smear", config.smear), ("backout", config.backout),
             (f"RoPE base {config.rope_base:g}", config.rope_base != defaults.rope_base),
             (f"q·k scale {config.qk_scale:g}", config.qk_scale != defaults.qk_scale)]
    return [name for name, on in named if on]


def output_folder(out: Path, force: bool) -> Path:
    """The absolute output folder. An existing one is replaced only with --force, and only if it
    looks like an earlier export (picochat.json or config.json in it): never the current folder,
    the root, the home folder, or any other folder that happens to be named."""
    out = Path(os.path.abspath(out.expanduser()))
    if not out.exists():
        return out
    if not force:
        raise PicochatError(f"{out} exists; pass --force to replace it")
    if out.resolve() in (Path.cwd().resolve(), Path("/"), Path.home().resolve()):
        raise PicochatError(f"refusing to replace {out}; pick an output folder of its own with --out")
    if not (out.is_dir() and ((out / PROVENANCE_FILE).is_file() or (out / "config.json").is_file())):
        raise PicochatError(f"{out} is not an earlier export (no {PROVENANCE_FILE} or config.json); "
                            f"--force replaces only those")
    return out


def checkpoint_config(meta: dict, origin: str) -> GPTConfig:
    """The checkpoint's GPTConfig; a config with fields picochat's GPT lacks is refused."""
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise PicochatError(f"{origin}: model_config is not picochat's GPTConfig ({e})") from None
    check_config(config, origin)
    return config


class staged_folder:
    """A temporary folder beside `out` that becomes `out` only if the block finishes; on any
    error it is removed, and an existing `out` (with --force) is replaced only at the very end
    (and kept if that fails)."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            for path in self.tmp.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            swap_into_place(self.tmp, self.out, self.out.with_name(f".{self.out.name}.old{os.getpid()}"))
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


# -----------------------------------------------------------------------------
# The model card

def lineage(stage: str, root: Path, step: int, meta: dict) -> list[tuple[str, str, int, dict]]:
    """(stage, tag, step, meta) of this checkpoint and those it was trained from, oldest first,
    as far as their checkpoints are still on disk (meta "source" links each to its parent)."""
    chain = [(stage, root.name, step, meta)]
    while isinstance(src := chain[-1][3].get("source"), dict) and len(chain) < len(SOURCES):
        parent = checkpoint_dir(src.get("stage", ""), src.get("tag", ""))
        try:
            chain.append((src["stage"], src["tag"], src["step"], load_meta(parent, src["step"])))
        except (OSError, KeyError, ValueError):
            break
    return chain[::-1]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_rows(chain) -> list[str]:
    """One table row per training stage: data, steps, batch, sequence length, time, last val bpb."""
    rows = []
    for stage, tag, step, meta in chain:
        user = meta.get("user_config", {})
        data = user.get("dataset") or user.get("mixture") or "–"
        if meta.get("imported"):
            data = f"imported from {meta['imported'].get('format', '?')}"
        metrics = read_jsonl_tail(checkpoint_dir(stage, tag) / "metrics.jsonl", "val_bpb")
        minutes = meta.get("loop", {}).get("total_time")
        rows.append(f"| {STAGE_NAMES.get(stage, stage)} | {tag} | {step} | {data} | "
                    f"{meta.get('total_batch_size', '–')} | {meta.get('max_seq_len', '–')} | "
                    f"{f'{minutes / 60:.1f}' if isinstance(minutes, (int, float)) else '–'} | "
                    f"{f'{metrics:.4f}' if isinstance(metrics, float) else '–'} |")
    return rows


def read_jsonl_tail(path: Path, key: str):
    """The last value of `key` in a JSON-lines file, if any."""
    value = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                value = json.loads(line).get(key, value)
            except (ValueError, AttributeError):
                continue
    return value


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def eval_lines(chain) -> list[str]:
    """What picochat's evaluations recorded for the checkpoints of this chain (exact steps only):
    base_eval's CORE score and bits per byte, chat_eval's accuracies (with the best constant
    answer's score where it recorded one) and ChatCORE."""
    home, lines = picochat_home(), []
    for stage, tag, step, _ in chain:
        at = f"- {stage} {tag} step {step}:"
        ev = read_json(home / "evals" / f"base_{tag}_step{step:06d}.json") if stage == "base" else None
        if isinstance(ev, dict):
            core = ev.get("core")
            if isinstance(core, dict) and is_number(core.get("score")):
                tasks = f" over {core['tasks_run']} tasks" if is_number(core.get("tasks_run")) else ""
                lines.append(f"{at} {core.get('metric', 'CORE')} {core['score']:.4f}{tasks}")
            lines += [f"{at} {key.removesuffix('_bpb')} bits per byte {value:.4f}"
                      for key, value in ev.items() if key.endswith("_bpb") and is_number(value)]
        ev = read_json(home / "evals" / f"chat_{stage}_{tag}_step{step:06d}.json")
        if not isinstance(ev, dict):
            continue
        results = ev["results"] if isinstance(ev.get("results"), dict) else {}
        problems = ev["problems"] if isinstance(ev.get("problems"), dict) else {}
        for task, value in results.items():
            if task.endswith("_chance") or not is_number(value):
                continue
            line = f"{at} {task} accuracy {value:.4f}"
            if is_number(n := problems.get(task)):
                line += f" over {n} problems"
            if is_number(chance := results.get(f"{task}_chance")):
                line += f" (baseline: the best constant answer scores {chance:.4f})"
            lines.append(line)
        if is_number(ev.get("chatcore")):
            lines.append(f"{at} ChatCORE {ev['chatcore']:.4f}")
    return lines


def flag_value(argv: list[str], flag: str) -> str | None:
    """What argparse gives `flag` in argv (the last `--flag value` or `--flag=value`), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def run_tag(command: str, argv: list[str]) -> str | None:
    """The tag a run of `command` saved under, as far as its argv tells: --model-tag, else
    base_train's d<depth>, else a fine-tuning stage's --source-tag (it keeps its source's tag).
    None when argv does not say (a fine-tuning run of "the only" source model)."""
    if tag := flag_value(argv, "--model-tag"):
        return tag
    if command == COMMAND_OF_STAGE["base"]:
        from picochat.stages import base_train
        return f"d{flag_value(argv, '--depth') or base_train.build_parser().get_default('depth')}"
    return flag_value(argv, "--source-tag") or None


def run_commands(chain) -> list[str]:
    """The successful `picochat` commands of the run log that trained checkpoints of this chain."""
    wanted = {(COMMAND_OF_STAGE.get(stage), tag) for stage, tag, _, _ in chain}
    lines = []
    for run in read_log(run_log_path()):
        if not isinstance(run, dict) or run.get("exit_code") != 0:
            continue
        command, argv = run.get("stage"), run.get("argv")
        if not (isinstance(command, str) and isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            continue  # not a line log_run wrote
        if (command, run_tag(command, argv)) in wanted:
            lines.append(shlex.join(["picochat", command, *argv]))
    return lines


def model_card(source: str, root: Path, step: int, meta: dict, config: GPTConfig) -> str:
    """README.md: what the model is, how it was trained (from the records picochat keeps), how to
    use it, and what it is not. Nothing is claimed that those records do not say."""
    params = sum(math.prod(shape) for shape in expected_shapes(config).values())
    native = config.is_seed()
    chain = lineage(source, root, step, meta)
    parts = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [picochat, nanochat]", "---", "",
        f"# {root.name} ({source}, step {step})", "",
        f"A {params / 1e6:.1f}M-parameter language model trained from scratch with picochat and exported "
        f"by `picochat export`. It is a small model: expect fluent-looking text that is often wrong.", "",
        "## Architecture", "",
        "picochat's GPT: pre-norm blocks with a parameter-free RMSNorm (also after the embedding and "
        "on queries and keys after RoPE), rotary embeddings, ReLU² MLP, untied embedding and head, "
        "logits softcapped at 15, no biases. " + (
            "transformers' NanoChat class holds it exactly (RoPE base 10,000)." if native else
            f"It also has {', '.join(parts_of(config))}, which transformers' NanoChat class lacks: the folder "
            f"carries its own modeling file (modeling_picochat.py), run with `trust_remote_code=True`."), "",
        "| layers | width | heads | kv heads | vocab | context (trained) | parameters |",
        "|---|---|---|---|---|---|---|",
        f"| {config.n_layer} | {config.n_embd} | {config.n_head} | {config.n_kv_head} | {config.vocab_size} | "
        f"{config.sequence_len} | {params:,} |", "",
        "## Training", "",
        "| stage | tag | step | data | tokens/step | seq len | minutes | last val bpb |",
        "|---|---|---|---|---|---|---|---|",
        *training_rows(chain), "",
    ]
    if commands := run_commands(chain):
        parts += ["Commands from the run log:", "", "```", *commands, "```", ""]
    evals = eval_lines(chain)
    parts += ["## Evaluation", "", *(evals or ["No picochat evaluation was recorded for this checkpoint."]), ""]
    parts += [
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH" + ("" if native else ", trust_remote_code=True") + ")",
        "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi!\"}],",
        "                              add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64)",
        "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```", "",
        "`tok(text)` starts with `<|bos|>`, as every training document did. The chat template "
        "renders picochat's format: `<|user_start|>…<|user_end|><|assistant_start|>…<|assistant_end|>`; "
        "a system message is joined to the first user message; an assistant message may be a list of "
        "parts `{\"type\": \"text\" | \"python\" | \"python_output\", \"text\": …}` (a calculator tool "
        "call and its result).", "",
        "## Limitations", "",
        "- transformers does not run the tool: a reply that opens `<|python_start|>` needs the caller to "
        "evaluate the expression and append `<|output_start|>result<|output_end|>` (`picochat serve` does this).",
        "- Special-token text inside a message (e.g. the literal string `<|bos|>`) becomes the special "
        "token in transformers; picochat treats it as plain text.",
        "- Beyond its trained context the model has not been tested.", "",
    ]
    return "\n".join(parts)

