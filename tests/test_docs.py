"""
The repository explains itself: every reference to a document in the code and the docs points at a
file that exists and, with `#anchor`, at a heading in it. Facts the code relies on live in
docs/DESIGN.md and are cited as `docs/DESIGN.md#<heading>` (GitHub's anchor for the heading);
nothing cites a section sign or a document outside the repository.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["picochat", "docs", "benchmarks", "runs", "README.md", "Makefile"]
SECTION_SIGN = "\u00a7"
SUFFIXES = {".py", ".md", ".sh", ".html", ".js", ".toml", ""}
# Names that look like document references but are not files of this repository.
NOT_OURS = {
    "report.md": "the report card picochat writes under $PICOCHAT_HOME",
    "RELEASE.md": "PyTorch's release notes (runs/torch_install.py)",
}
REFERENCE = re.compile(r"(?<![\w/.$-])((?:[\w.-]+/)*[\w.-]+\.md)(?:#([\w-]+))?")
LOCAL_LINK = re.compile(r"\]\(#([\w-]+)\)")


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in candidates if p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return files


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (code blocks skipped)."""
    found, fenced = set(), False
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def resolve(reference: str, source: Path) -> Path | None:
    for base in (ROOT, source.parent, ROOT / "docs"):
        if (base / reference).is_file():
            return base / reference
    return None


def test_every_document_reference_names_an_existing_file_and_heading():
    broken, checked = [], 0
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(ROOT)
        for n, line in enumerate(text.splitlines(), 1):
            if SECTION_SIGN in line:
                broken.append(f"{where}:{n}: a section sign; cite docs/DESIGN.md#<heading> instead: {line.strip()}")
            for reference, anchor in REFERENCE.findall(line):
                if Path(reference).name in NOT_OURS:
                    continue
                target = resolve(reference, path)
                checked += 1
                if target is None:
                    broken.append(f"{where}:{n}: {reference} does not exist")
                elif anchor and anchor not in anchors(target):
                    broken.append(f"{where}:{n}: {reference} has no heading for #{anchor}")
            if path.suffix == ".md":
                for anchor in LOCAL_LINK.findall(line):
                    checked += 1
                    if anchor not in anchors(path):
                        broken.append(f"{where}:{n}: no heading for #{anchor} in this file")
    assert checked > 50, f"only {checked} references found: is the pattern still right?"
    assert not broken, "\n".join(broken)


def test_the_design_doc_covers_what_the_code_relies_on():
    headings = anchors(ROOT / "docs" / "DESIGN.md")
    for needed in ("model", "initialization", "optimizer", "schedules", "pretraining", "pretraining-data",
                   "tokenizer", "chat-format", "tool-use", "engine", "bits-per-byte", "core",
                   "chat-evals-and-chatcore", "checkpoints", "where-picochat-differs-from-nanochat"):
        assert needed in headings, needed
