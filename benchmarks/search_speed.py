"""
The search tool's query time on an index, against the one-query reference (search.reference_search:
SQLite calls title_key on every matching page) in the same run, alternating, on the same queries.
Checks that the two return the same pages.

    PICOCHAT_HOME=/tmp/freshhome python benchmarks/search_speed.py               # the demo index
    PICOCHAT_HOME=/tmp/freshhome python benchmarks/search_speed.py --queries 500 --index demo

The queries are page titles as asked in chat: the title, "the title?", "What is Title?" and "Tell
me about the title", drawn with a fixed seed.
"""
from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picochat.search import index_path, reference_search, search  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--index", default="demo", help="index name under $PICOCHAT_HOME/index")
    p.add_argument("--queries", type=int, default=1000, help="queries per form (4 forms)")
    p.add_argument("--seed", type=int, default=0, help="which titles are drawn")
    args = p.parse_args()
    path = index_path(args.index)
    if not path.is_file():
        p.error(f"no index at {path}; build it with `picochat index build --dataset {args.index}`")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    titles = [row[0] for row in db.execute("SELECT title FROM pages")]
    db.close()
    rng = random.Random(args.seed)
    forms = ("{}", "the {}?", "What is {}?", "Tell me about the {}")
    queries = [form.format(t.lower() if i % 2 else t)
               for i, form in enumerate(forms) for t in rng.sample(titles, min(args.queries, len(titles)))]
    times = {"search": [], "reference": []}
    differ = 0
    for q in queries:
        t0 = time.perf_counter()
        fast = search(path, q)
        t1 = time.perf_counter()
        slow = reference_search(path, q)
        t2 = time.perf_counter()
        times["search"].append(t1 - t0)
        times["reference"].append(t2 - t1)
        differ += fast != slow
    print(f"{len(queries)} queries on {path} ({len(titles):,} pages); {differ} gave other pages than the reference")
    print(f"{'':<10} {'mean ms':>8} {'median ms':>10} {'max ms':>8}")
    for name, ts in times.items():
        print(f"{name:<10} {1000 * statistics.mean(ts):>8.2f} {1000 * statistics.median(ts):>10.2f} {1000 * max(ts):>8.2f}")
    print(f"reference / search: {statistics.mean(times['reference']) / statistics.mean(times['search']):.2f}x (mean)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
