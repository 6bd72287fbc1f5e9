"""
`picochat tok_eval`: how well the tokenizer compresses text, in UTF-8 bytes per token (higher is
better), beside OpenAI's GPT-2 and GPT-4 (cl100k_base) tokenizers for scale.

Texts: built-in snippets (news, code, math, science, Korean) and the first row group of the dataset's
train and val shards (val is held out from tokenizer training; train is what it was trained on).
tiktoken downloads the GPT-2/GPT-4 vocabularies on first use; where that fails (offline) their
columns are left out and only ours is shown.

    picochat tok_eval                      # the tokenizer's own dataset, $PICOCHAT_HOME/tokenizer
    picochat tok_eval --dataset fineweb-edu --tokenizer /tmp/tok
"""
from __future__ import annotations

import threading
from pathlib import Path

from picochat.cli import Parser
from picochat.common import PicochatError, print0, tokenizer_dir
from picochat.data.shards import list_shards, open_shard, read_row_group
from picochat.tokenizer import Tokenizer, default_dataset

BASELINES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}  # column name -> tiktoken encoding
BASELINE_TIMEOUT_S = 20  # tiktoken's download has no timeout of its own; don't hang offline

# Written for picochat; each is a few hundred bytes of one kind of text.
SNIPPETS = {
    "news": (
        "HARBOR CITY, March 4 (Wire) - The port authority said on Tuesday that container traffic rose "
        "11.2% in February from a year earlier, the third straight monthly gain, as shippers rerouted "
        "cargo away from congested terminals further south. \"We are seeing volumes we last saw before "
        "the pandemic,\" a spokeswoman told reporters, adding that two new cranes would enter service "
        "by June. Shares of the largest terminal operator closed up 3.4% at $48.15."
    ),
    "code": (
        "def moving_average(values: list[float], window: int = 3) -> list[float]:\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n"
    ),
    "math": (
        "\\begin{theorem}\nLet $f:[a,b]\\to\\mathbb{R}$ be continuous and differentiable on $(a,b)$. "
        "Then there is $c\\in(a,b)$ with\n\\[ f'(c) = \\frac{f(b)-f(a)}{b-a}. \\]\n\\end{theorem}\n"
        "\\begin{proof}\nApply Rolle's theorem to $g(x) = f(x) - \\frac{f(b)-f(a)}{b-a}(x-a)$, "
        "for which $g(a)=g(b)=f(a)$. \\qed\n\\end{proof}\n"
        "For example, $\\sum_{k=1}^{n} k^2 = \\frac{n(n+1)(2n+1)}{6}$ and $e^{i\\pi}+1=0$."
    ),
    "science": (
        "Mitochondria generate most of the cell's supply of adenosine triphosphate (ATP) through "
        "oxidative phosphorylation. Electrons from NADH and FADH2 pass along the electron transport "
        "chain in the inner membrane, pumping protons into the intermembrane space; the resulting "
        "electrochemical gradient, roughly 150-180 mV, drives ATP synthase. Uncoupling proteins let "
        "protons leak back without making ATP, releasing the energy as heat in brown adipose tissue."
    ),
    "korean": (
        "서울의 봄은 짧지만 아름답다. 3월 말이 되면 한강 주변에 벚꽃이 피기 시작하고, 많은 사람들이 "
        "주말마다 공원으로 나들이를 간다. 올해는 평년보다 일주일 정도 일찍 꽃이 필 것으로 예상된다고 "
        "기상청이 밝혔다. 시민들은 따뜻한 날씨를 반기면서도 미세먼지를 걱정하고 있다."
    ),
}


def parse_args(argv):
    p = Parser("tok_eval", "Bytes per token of our tokenizer vs GPT-2 and GPT-4 on fixed and held-out text.")
    p.add_argument("--dataset", default="", help="dataset whose first train/val row groups are measured "
                   "(default: the one the tokenizer was trained on)")
    p.add_argument("--tokenizer", type=Path, default=tokenizer_dir(), help="tokenizer directory")
    return p.parse_args(argv)


def load_baseline(encoding_name: str):
    """tiktoken's encoding, or None when it can't be had (no network, no cache, too slow)."""
    result = {}

    def fetch():
        try:
            import tiktoken
            result["enc"] = tiktoken.get_encoding(encoding_name)
        except Exception:  # any failure to fetch just means: no column for it
            pass

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(BASELINE_TIMEOUT_S)
    return result.get("enc")


def dataset_texts(dataset: str) -> dict[str, str]:
    """The first row group of the first shard of each split, joined into one text; missing splits are skipped."""
    texts = {}
    for split in ("train", "val"):
        try:
            path = list_shards(dataset, split)[0]
        except PicochatError as e:
            print0(f"({dataset}-{split} skipped: {e})")
            continue
        texts[f"{dataset}-{split}"] = "\n".join(read_row_group(path, open_shard(path), 0))
    return texts


def main(argv=None):
    args = parse_args(argv)
    ours = Tokenizer.load(args.tokenizer)
    columns = {f"ours {ours.vocab_size:,}": ours.enc}
    for column, encoding_name in BASELINES.items():
        enc = load_baseline(encoding_name)
        if enc is None:
            print0(f"({column}: tiktoken's {encoding_name} is not available offline; column left out)")
        else:
            columns[f"{column} {enc.n_vocab:,}"] = enc

    texts = dict(SNIPPETS) | dataset_texts(args.dataset or default_dataset(ours))
    header = f"{'text':<16}{'bytes':>12}" + "".join(f"{name:>24}" for name in columns)
    print0("bytes per token (tokens); higher bytes per token = better compression")
    print0(header)
    print0("-" * len(header))
    for label, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        row = f"{label:<16}{n_bytes:>12,}"
        for enc in columns.values():
            n_tokens = len(enc.encode_ordinary(text))
            cell = f"{n_bytes / max(n_tokens, 1):.2f} ({n_tokens:,})"
            row += f"{cell:>24}"
        print0(row)
    return 0
