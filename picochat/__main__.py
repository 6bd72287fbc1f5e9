"""
`picochat <stage> [flags]` and `python -m picochat <stage> [flags]` (so `torchrun -m picochat ...`
works). Each stage lives in picochat/stages/<stage>.py (`import` in import_.py, a keyword) and
exposes main(argv).
"""
from __future__ import annotations

import importlib
import sys

from picochat.common import PicochatError, tune_cpu_allocator

STAGES = {
    "data": "download, build or import pretraining shards (data download | data demo | data import)",
    "index": "build or search the full-text index of the search tool (index build | index search)",
    "tok_train": "train the BPE tokenizer on a dataset",
    "tok_eval": "bytes per token of the tokenizer on held-out text",
    "base_train": "pretrain the base model",
    "base_eval": "evaluate a base checkpoint: CORE, train/val bits per byte, samples",
    "mid_train": "midtrain a base model on conversations, tool use and spelling",
    "sft": "supervised fine-tuning on assistant tokens only",
    "rl": "reinforcement learning on a task with a checker (GSM8K; SpellingBee, Arithmetic offline)",
    "chat_eval": "accuracy of a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee",
    "chat": "talk to a chat model in the terminal (interactive or -p)",
    "serve": "OpenAI-compatible API and web chat UI with continuous batching",
    "report": "write the report card of a run: environment, stages, summary table, plots",
    "export": "write a checkpoint as a transformers folder (weights, tokenizer, chat template, card)",
    "import": "import a transformers folder or a nanochat checkpoint as a picochat checkpoint",
}


def usage() -> str:
    lines = ["usage: picochat <stage> [flags]   (picochat <stage> --help for its flags)", "", "stages:"]
    lines += [f"  {name:<12} {text}" for name, text in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        sys.stderr.write(f"picochat: error: unknown stage {stage!r}; choose one of {', '.join(STAGES)}\n")
        return 2
    tune_cpu_allocator()  # before the stage allocates anything
    import time
    start, code = time.time(), 1  # 1 unless the stage returns or fails in a way we know
    try:
        module = importlib.import_module(f"picochat.stages.{'import_' if stage == 'import' else stage}")
        code = module.main(rest) or 0
        return code
    except PicochatError as e:
        sys.stderr.write(f"picochat {stage}: error: {e}\n")
        code = 2
        return code
    except KeyboardInterrupt:
        sys.stderr.write(f"picochat {stage}: interrupted\n")
        code = 130
        return code
    except SystemExit:  # argparse: --help or a bad flag; nothing ran, nothing to log
        code = None
        raise
    finally:
        # One line in $PICOCHAT_HOME/report/runs.jsonl for the report card (rank 0). Best effort:
        # a full disk or a read-only home must never turn a finished stage into a failed one.
        try:
            if code is not None:
                from picochat.report import log_run
                log_run(stage, rest, start, time.time(), code)
        except Exception as e:  # noqa: BLE001
            sys.stderr.write(f"picochat {stage}: warning: could not append to the run log: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
