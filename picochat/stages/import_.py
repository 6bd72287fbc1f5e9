"""
`picochat import`: bring a model in from elsewhere, as a checkpoint picochat chat/serve/evals run.

    picochat import ./my-export                       # a folder written by `picochat export` (or the Hub layout)
    picochat import ~/.cache/nanochat/chatsft_checkpoints/d20 --model-tag d20 --stage sft

Two formats are read: a transformers folder (config.json, safetensors weights, tokenizer.json) of
model_type "nanochat" or "picochat" (an export with its own modeling file, which is never run), and
a nanochat checkpoint directory of any design from the seed's to HEAD's (model_NNNNNN.pt,
meta_NNNNNN.json; its tokenizer.pkl beside it or in nanochat's cache layout, or --tokenizer;
picochat/interop/nanochat.py maps each design). Nothing in them is executed: weights load as plain
tensors and tokenizer.pkl through a one-class unpickler.

Every tensor is checked against picochat's GPT before anything is written; the checkpoint is then
written under $PICOCHAT_HOME/checkpoints/<stage>/<tag>/ (an existing tag only with --force), and the
tokenizer beside it and, when there is none yet, to $PICOCHAT_HOME/tokenizer (which picochat shares
between all models, so a different one replaces it only with --replace-tokenizer).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from picochat.checkpoint import save_checkpoint
from picochat.cli import Parser
from picochat.common import PicochatError, checkpoint_dir, tokenizer_dir
from picochat.interop import check_state_dict, hf, nanochat, swap_into_place
from picochat.tokenizer import TOKENIZER_FILE, Tokenizer

STAGES = ("base", "mid", "sft")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # fullmatch: a single path component, no newline


def build_parser() -> Parser:
    p = Parser("import", "Import a transformers-format folder (picochat export, nanochat on the Hub) or a "
                         "nanochat checkpoint directory as a picochat checkpoint.")
    p.add_argument("path", type=Path, help="the folder or checkpoint directory to import")
    p.add_argument("--stage", default="sft", choices=STAGES, help="which stage's checkpoints it joins")
    p.add_argument("--model-tag", default="", help="tag to save under (default: the folder's name)")
    p.add_argument("--step", type=int, default=-1, help="nanochat checkpoint step to import (-1: latest)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="nanochat tokenizer directory (default: beside the checkpoint, or ../../tokenizer)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint of this stage and tag")
    p.add_argument("--replace-tokenizer", action="store_true",
                   help="replace a different tokenizer in $PICOCHAT_HOME/tokenizer (models trained with "
                        "the old one then stop loading or, if its vocab size is the same, load but "
                        "tokenize wrongly)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    src = args.path.expanduser().resolve()  # nanochat's tokenizer is found relative to it
    if not src.is_dir():
        raise PicochatError(f"{src} is not a directory")
    if (src / "config.json").is_file():
        state, config, tokenizer, origin = read_hf_folder(src)
    elif nanochat.is_checkpoint_dir(src):
        state, config, tokenizer, origin = read_nanochat_dir(src, args.step, args.tokenizer)
    else:
        raise PicochatError(f"{src} has neither config.json (transformers) nor model_NNNNNN.pt (nanochat)")
    check_state_dict(state, config, origin["path"])
    if tokenizer.vocab_size != config.vocab_size:
        raise PicochatError(f"the model has vocab {config.vocab_size} but its tokenizer {tokenizer.vocab_size}")

    tag = args.model_tag or origin.get("model_tag") or src.name
    if not TAG.fullmatch(tag):
        raise PicochatError(f"model tag {tag!r} must be letters, digits, '.', '_' or '-'; pick one with --model-tag")
    root = checkpoint_dir(args.stage, tag)
    if root.exists() and not args.force:
        raise PicochatError(f"{root} exists; pass --force to replace it, or pick another --model-tag")
    write_shared = not (tokenizer_dir() / TOKENIZER_FILE).is_file()
    if not write_shared and (conflict := shared_tokenizer_conflict(tokenizer)):
        if not args.replace_tokenizer:
            raise PicochatError(f"{tokenizer_dir()} holds a different tokenizer ({conflict}); pass "
                                f"--replace-tokenizer, or import into a fresh PICOCHAT_HOME")
        write_shared = True

    step = origin["step"]
    meta = {"step": step, "stage": args.stage, "model_config": config.to_dict(),
            "user_config": {"model_tag": tag}, "compute_dtype": "float32",
            "imported": {k: v for k, v in origin.items() if k != "model_tag"}}
    write_checkpoint(root, step, state, meta, tokenizer)
    if write_shared:  # the same tokenizer already there is left alone (it may record trained_on)
        tokenizer.save(tokenizer_dir())
    design = f" ({origin['design']})" if "design" in origin else ""
    print(f"imported {origin['format']} model{design} from {src} → {root} (step {step}); "
          f"run it with `picochat chat --source {args.stage} --model-tag {tag}`")
    return 0


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PicochatError(f"{path} is unreadable or not valid JSON ({e})") from None


def read_hf_folder(src: Path):
    """(state, config, tokenizer, origin) of a transformers folder. picochat.json, written by
    picochat export, gives back the original tag and step."""
    provenance = read_provenance(src / "picochat.json")
    cfg, origin = read_json(src / "config.json"), str(src / "config.json")
    native = not (isinstance(cfg, dict) and cfg.get("model_type") == hf.REMOTE_MODEL_TYPE)
    if native:
        config, note = hf.gpt_config_from_hf(cfg, origin)
        if note:
            print(f"note: {note}")
    else:  # picochat's own modeling file: only config.json and the weights are read, no code is run
        config = hf.gpt_config_from_remote(cfg, origin)
    if not (src / "tokenizer.json").is_file():
        raise PicochatError(f"no tokenizer.json in {src}")
    tokenizer = hf.tokenizer_from_hf(src / "tokenizer.json")
    state = hf.load_weights(src, native)
    origin = {"format": "transformers", "path": str(src), **provenance}
    return state, config, tokenizer, origin


def read_provenance(path: Path) -> dict:
    """step and model_tag from picochat.json (step 0 and no tag when there is no such file)."""
    if not path.is_file():
        return {"step": 0, "model_tag": None}
    provenance = read_json(path)
    if not isinstance(provenance, dict):
        raise PicochatError(f"{path} holds a {type(provenance).__name__}, not a JSON object")
    step, tag = provenance.get("step", 0), provenance.get("model_tag")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise PicochatError(f"{path}: step {step!r} is not a non-negative integer")
    if tag is not None and not (isinstance(tag, str) and TAG.fullmatch(tag)):
        raise PicochatError(f"{path}: model_tag {tag!r} is not a tag (letters, digits, '.', '_' or '-')")
    return {"step": step, "model_tag": tag}


def read_nanochat_dir(src: Path, step: int, tokenizer_path: Path | None):
    """(state, config, tokenizer, origin) of a nanochat checkpoint directory at `step`."""
    available = nanochat.steps(src)
    step = available[-1] if step < 0 else step
    if step not in available:
        raise PicochatError(f"no model_{step:06d}.pt in {src}; steps there: {', '.join(map(str, available))}")
    _, model_config = nanochat.read_meta(src, step)
    tokenizer = nanochat.read_tokenizer(tokenizer_path.expanduser() if tokenizer_path
                                        else nanochat.find_tokenizer_dir(src))
    path = src / f"model_{step:06d}.pt"
    config, state, design = nanochat.to_picochat(model_config, nanochat.read_state(src, step), str(path))
    origin = {"format": "nanochat", "design": design.name, "path": str(path), "step": step}
    return state, config, tokenizer, origin


def shared_tokenizer_conflict(tokenizer: Tokenizer) -> str | None:
    """Why the tokenizer already in $PICOCHAT_HOME/tokenizer is not this one (None: there is
    none, or it is the same: same tokens, pattern and special tokens)."""
    if not (tokenizer_dir() / TOKENIZER_FILE).is_file():
        return None
    try:
        current = Tokenizer.load(tokenizer_dir())
    except PicochatError:
        return "an unreadable one"
    if current.vocab_size != tokenizer.vocab_size:
        return f"vocab {current.vocab_size}, the import has {tokenizer.vocab_size}"
    if (current.tokens, current.pattern, current.special_ids) != (tokenizer.tokens, tokenizer.pattern,
                                                                  tokenizer.special_ids):
        return "same size, other tokens"
    return None


def write_checkpoint(root: Path, step: int, state: dict, meta: dict, tokenizer: Tokenizer) -> None:
    """Write the checkpoint (and a copy of its tokenizer) in <stage>/.importing/, which no tag
    lookup lists and which shares the stage folder's filesystem, then rename it to <stage>/<tag>:
    the tag never exists half-written, and an old one (--force) survives any failure."""
    scratch = root.parent / ".importing"
    staging, aside = scratch / f"{root.name}-{os.getpid()}", scratch / f"{root.name}-{os.getpid()}.old"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(staging, step, {k: v.contiguous() for k, v in state.items()}, meta, {})
        tokenizer.save(staging / "tokenizer")
        swap_into_place(staging, root, aside)
    except OSError as e:
        raise PicochatError(f"could not write {root} ({e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            scratch.rmdir()  # once no other import is using it
        except OSError:
            pass
