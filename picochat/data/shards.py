"""
Pretraining shards on disk: parquet files with one `text` column, written in row groups.

A dataset is a directory `$PICOCHAT_HOME/data/<dataset>/` holding train shards `shard_NNNNN.parquet`
and validation shards `val_NNNNN.parquet`. The validation split is therefore fixed by name, never
"whichever shard happens to be last" (nanochat's seed behaviour, which moved as more shards arrived).
The Hub datasets below name their validation shard in HUB_DATASETS; the downloader saves it as
val_NNNNN.parquet, so a few train shards and the val shard split the same as all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.common import PicochatError, atomic_path, data_dir

ROW_GROUP_SIZE = 1024  # documents per row group, as in the FineWeb-Edu repackaging (docs/DESIGN.md#pretraining-data)
SPLIT_PREFIX = {"train": "shard_", "val": "val_"}


@dataclass(frozen=True)
class HubDataset:
    """A pretraining set repackaged by nanochat's author as shard_NNNNN.parquet files in a Hub repo."""
    repo: str
    num_shards: int  # shard_00000 .. shard_{num_shards - 1:05d}
    val_shard: int   # always downloaded, kept as val_NNNNN.parquet, never trained on


# docs/DATA.md#pretraining-data-from-the-hub: nanochat's seed trained on FineWeb-Edu, its HEAD on ClimbMix.
HUB_DATASETS = {
    "fineweb-edu": HubDataset("karpathy/fineweb-edu-100b-shuffle", num_shards=1823, val_shard=1822),
    "climbmix": HubDataset("karpathy/climbmix-400b-shuffle", num_shards=6543, val_shard=6542),
}


def shard_name(index: int, split: str = "train") -> str:
    return f"{SPLIT_PREFIX[split]}{index:05d}.parquet"


def list_shards(dataset: str, split: str) -> list[Path]:
    """Sorted shard paths of one split; a clear error when there are none."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be train or val, got {split!r}")
    root = data_dir(dataset)
    paths = sorted(root.glob(f"{SPLIT_PREFIX[split]}*.parquet"))
    hub = HUB_DATASETS.get(dataset)
    if hub is not None and split == "train":
        # nanochat keeps the val shard under its Hub name; copied here it would train on validation
        val_as_train = root / shard_name(hub.val_shard, "train")
        if val_as_train in paths:
            raise PicochatError(f"{val_as_train} is {dataset}'s validation shard under its Hub name; "
                                f"rename it to {shard_name(hub.val_shard, 'val')} so it is not trained on")
    if not paths:
        hint = ("picochat data demo" if dataset == "demo"
                else "picochat data download -n 8" if dataset == "fineweb-edu"
                else f"picochat data download --dataset {dataset} -n 8" if hub is not None
                else f"picochat data import --name {dataset} FILES...")
        raise PicochatError(f"no {split} shards for dataset {dataset!r} in {root}; run `{hint}` first")
    return paths


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard, turning a corrupt or truncated file into an error that names it."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PicochatError(f"shard {path} is corrupt or truncated ({e}); delete it and download or "
                            f"build it again") from None
    if "text" not in pf.schema_arrow.names:
        raise PicochatError(f"shard {path} has no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


def read_row_group(path: Path, pf: pq.ParquetFile, index: int) -> list[str]:
    try:
        return pf.read_row_group(index, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise PicochatError(f"shard {path} row group {index} cannot be read ({e}); "
                            f"the file is corrupt: delete it and download or build it again") from None


def check_shard(path: Path) -> int:
    """Full integrity check: every row group decodes. Returns the number of documents."""
    pf = open_shard(path)
    for i in range(pf.num_row_groups):
        try:
            pf.read_row_group(i, columns=["text"])
        except (pa.ArrowException, OSError) as e:
            raise PicochatError(f"shard {path} is corrupt in row group {i} ({e})") from None
    return pf.metadata.num_rows


def write_shard(path: Path, texts: list[str], row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Write one shard atomically (zstd, row groups of `row_group_size` documents)."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd",
                       use_dictionary=False, write_statistics=False)


def iter_texts(dataset: str, split: str = "train", max_chars: int | None = None,
               doc_cap: int | None = None) -> Iterator[str]:
    """Documents in shard order, each cut to `doc_cap` chars, stopping after `max_chars` in total."""
    seen = 0
    for path in list_shards(dataset, split):
        pf = open_shard(path)
        for rg in range(pf.num_row_groups):
            for text in read_row_group(path, pf, rg):
                if doc_cap is not None:
                    text = text[:doc_cap]
                if max_chars is not None and seen + len(text) > max_chars:
                    remaining = max_chars - seen
                    if remaining > 0:
                        yield text[:remaining]
                    return
                seen += len(text)
                yield text
