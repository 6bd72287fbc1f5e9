"""
Argument parsing shared by every stage: help text that shows each flag's default, and one-line
errors ("picochat base_train: error: ... (see --help)") instead of a usage dump.
"""
from __future__ import annotations

import argparse
import sys


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each flag's help, unless the help already says its default."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, description: str):
        super().__init__(prog=f"picochat {prog}", description=description,
                         formatter_class=DefaultsHelpFormatter)

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_or_auto(text: str):
    """A positive integer, or the word 'auto'."""
    return text if text == "auto" else positive_int(text)


def add_device_args(parser, auto_dtype: str = "bf16 on CUDA SM80+ and on CPUs where it measures faster") -> None:
    """--dtype and --device, the same in every stage that runs a model."""
    parser.add_argument("--dtype", default="auto", help=f"compute dtype: auto ({auto_dtype}), bfloat16 or float32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def add_source_args(parser, stage: str, default_source: str) -> None:
    """The flags of a stage that starts from another stage's checkpoint (mid_train, sft, rl)."""
    from picochat.common import TRAINING_STAGES
    parser.add_argument("--source", default=default_source, choices=TRAINING_STAGES[stage].starts_from,
                        help=f"stage to start from (default: {default_source})")
    parser.add_argument("--source-tag", default="", help="tag of the starting checkpoint (default: the only one)")
    parser.add_argument("--source-step", type=int, default=-1, help="step of the starting checkpoint (-1: latest)")
    parser.add_argument("--model-tag", default="", help="tag to save under (default: the source's tag)")


def check_tags(args) -> None:
    """--model-tag and --source-tag name directories, never paths out of $PICOCHAT_HOME."""
    from picochat.common import check_model_tag
    for flag in ("model_tag", "source_tag"):
        if getattr(args, flag, ""):
            check_model_tag(getattr(args, flag), "--" + flag.replace("_", "-"))
