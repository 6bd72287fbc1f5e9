"""
`picochat tok_train`: train the BPE tokenizer on the train split of a dataset and save it.

Documents are cut to --doc-cap characters and training stops after --max-chars characters in total
(docs/DESIGN.md#tokenizer: the speedrun uses 2B chars, docs capped at 10,000). The result goes to
$PICOCHAT_HOME/tokenizer (or --output), where every later stage finds it. The tokenizer records the
dataset it read, and base_train, base_eval and tok_eval use that dataset unless given --dataset.

    picochat tok_train                                  # demo corpus, vocab 65,536
    picochat tok_train --dataset fineweb-edu --max-chars 2_000_000_000
    picochat tok_train --vocab-size 4096 --output /tmp/tok
"""
from __future__ import annotations

import time
from pathlib import Path

from picochat.cli import Parser
from picochat.common import PicochatError, print0, progress_bar, tokenizer_dir
from picochat.data.shards import iter_texts, list_shards, open_shard
from picochat.tokenizer import DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE, SPECIAL_TOKENS, train_tokenizer


def parse_args(argv):
    p = Parser("tok_train", "Train the BPE tokenizer (rustbpe) and save it for tiktoken.")
    p.add_argument("--dataset", default="demo", help="dataset under $PICOCHAT_HOME/data to train on")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    p.add_argument("--doc-cap", type=int, default=10_000, help="cut each document to this many characters")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"BPE ranks + {len(SPECIAL_TOKENS)} special tokens")
    p.add_argument("--output", type=Path, default=tokenizer_dir(), help="directory to save the tokenizer to")
    return p.parse_args(argv)


def estimate_chars(dataset: str, max_chars: int) -> int:
    """Total for the progress bar: the train split's uncompressed text size from the parquet footers
    (bytes, so a slight overestimate for non-ASCII text), capped at --max-chars."""
    total = 0
    for path in list_shards(dataset, "train"):
        meta = open_shard(path).metadata
        for rg in range(meta.num_row_groups):
            total += sum(meta.row_group(rg).column(c).total_uncompressed_size
                         for c in range(meta.num_columns))
    return min(total, max_chars)


def main(argv=None):
    args = parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise PicochatError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                            f"{len(SPECIAL_TOKENS)} special tokens + 1 merge), got {args.vocab_size}")
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise PicochatError(f"--max-chars and --doc-cap must be positive, got {args.max_chars} and {args.doc_cap}")
    # Fail on a missing or corrupt dataset now, not from inside the Rust trainer's iterator.
    total = estimate_chars(args.dataset, args.max_chars)

    print0(f"training a {args.vocab_size:,}-token tokenizer on {args.dataset!r} "
           f"(up to {args.max_chars:,} chars, docs capped at {args.doc_cap:,})")
    bar = progress_bar(total=total, unit="char", unit_scale=True, desc="reading")
    consumed = 0

    def texts():
        nonlocal consumed
        for text in iter_texts(args.dataset, "train", max_chars=args.max_chars, doc_cap=args.doc_cap):
            consumed += len(text)
            bar.update(len(text))
            yield text
        # all text read: the total was an estimate, so end the bar at 100%; rustbpe merges next
        bar.total = bar.n
        bar.set_description("read, now merging")
        bar.refresh()

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts(), args.vocab_size)  # the merges run after the last text is read
    tokenizer.trained_on = args.dataset  # later stages default to this dataset
    seconds = time.perf_counter() - t0
    bar.close()
    if consumed == 0:
        raise PicochatError(f"dataset {args.dataset!r} has no text in its train split")
    tokenizer.save(args.output)

    print0(f"trained on {consumed:,} chars in {seconds:.1f}s ({consumed / max(seconds, 1e-9) / 1e6:.2f}M chars/s)")
    print0(f"vocab size {tokenizer.vocab_size:,} (bos id {tokenizer.bos_id:,}); saved to {args.output}")
    if tokenizer.vocab_size < args.vocab_size:
        print0(f"note: the text ran out of pairs to merge, so the vocab is {tokenizer.vocab_size:,} rather "
               f"than {args.vocab_size:,}; train on more text for the full size")
    lengths = tokenizer.token_bytes().float()
    regular = lengths[lengths > 0]
    partial = sum(1 for token in tokenizer.tokens[256:] if not is_utf8(token))  # merges only
    print0(f"token bytes: {len(lengths) - len(regular)} special (0 bytes); the other {len(regular):,} have "
           f"min {regular.min():.0f}, max {regular.max():.0f}, mean {regular.mean():.2f}, "
           f"std {regular.std():.2f}; {partial:,} merged tokens are partial UTF-8 sequences")
    return 0


def is_utf8(token: bytes) -> bool:
    try:
        token.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
