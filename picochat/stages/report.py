"""
Write the report card of a run: environment, each stage's config and results, the summary table
(CORE, ARC, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE by stage), wall time, estimated cost,
and PNG plots, all in one markdown file (the work is in picochat/report.py).

    picochat report                                  # $PICOCHAT_HOME/report/report.md
    picochat report --model-tag demo --output report.md
"""
from __future__ import annotations

from picochat.cli import Parser
from picochat.report import write_report


def build_parser() -> Parser:
    p = Parser("report", "Write the report card of a run as markdown, with PNG plots next to it.")
    p.add_argument("--model-tag", default="",
                   help="tag of the last stage to report; earlier stages are the checkpoints it started "
                        "from (default: the newest tag of the last stage trained)")
    p.add_argument("--output", default="", help="markdown file to write (default: $PICOCHAT_HOME/report/report.md)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    path = write_report(args.output or None, args.model_tag or None)
    print(f"wrote the report card to {path}")
    return 0
