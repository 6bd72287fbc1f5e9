"""
Checkpoints a hostile or broken disk hands back: a planted pickle never runs, every file is checked
against meta.json's manifest, a corrupt newest checkpoint is skipped on --resume (falling back to
the previous intact one), a torn metrics.jsonl line is dropped with a warning, a full disk says so
and leaves the previous checkpoint loadable, and a model tag is a name, never a path.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import uuid

import pytest
import torch

from picochat.checkpoint import (CorruptCheckpointError, _meta_digest, list_steps, load_checkpoint,
                                 load_meta, load_model, save_checkpoint, step_dir)
from picochat.common import PicochatError, check_model_tag, checkpoint_dir
from picochat.training import load_for_resume, run_is_complete, truncate_metrics
from stagerun import losses, picochat

TRAIN = ["--dataset", "tiny", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "4",
         "--total-batch-size", "512", "--dtype", "float32", "--device", "cpu", "--eval-every", "5",
         "--eval-tokens", "1024", "--sample-every", "-1", "--embedding-lr", "0.05", "--matrix-lr", "0.02",
         "--num-iterations", "10", "--save-every", "5", "--keep-last", "0"]


@pytest.fixture(scope="module")
def trained(tiny_home):
    """A base run with intact checkpoints at steps 5 and 10 (tag "safety"); tests corrupt copies."""
    picochat(tiny_home, "base_train", *TRAIN, "--model-tag", "safety")
    return tiny_home


def copy_run(home, tag: str | None = None):
    """A private copy of the "safety" run; returns its checkpoint root."""
    dst = home / "checkpoints" / "base" / (tag or f"c{uuid.uuid4().hex[:8]}")
    shutil.copytree(home / "checkpoints" / "base" / "safety", dst)
    return dst


def one_line(text: str) -> bool:
    return "\n" not in text.strip() and "Traceback" not in text


class Plant:
    """Unpickling this creates `marker` (builtins.open(marker, "w")): code running on load."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def resign(d, name, **meta_changes):
    """Update meta.json's manifest for `name` as a forger would (valid sizes and digests), with
    `meta_changes` written into meta.json first."""
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("meta_sha256")
    meta.update(meta_changes)
    data = (d / name).read_bytes()
    meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    meta["meta_sha256"] = _meta_digest(meta)
    (d / "meta.json").write_text(json.dumps(meta))


def plant_sparse(path):
    """Replace the first tensor of a torch file with a sparse one whose index is 2**40 (weights_only
    loads it; copying it into a dense weight fails deep in torch), and re-sign the manifest."""
    state = torch.load(path, weights_only=True)
    stack = [state]
    while stack:  # the first tensor met, however deep (the rank file's is in the optimizer state)
        container = stack.pop()
        keys = container.keys() if isinstance(container, dict) else range(len(container))
        tensors = [k for k in keys if isinstance(container[k], torch.Tensor)]
        if tensors:
            container[tensors[0]] = torch.sparse_coo_tensor(torch.tensor([[2**40]]), torch.tensor([1.0]), (2**41,),
                                                                check_invariants=False)
            break
        stack.extend(v for k in keys if isinstance(v := container[k], (dict, list)))
    torch.save(state, path)
    resign(path.parent, path.name)


# -----------------------------------------------------------------------------
# the checkpoint as written

@pytest.mark.slow
def test_a_checkpoint_has_a_manifest_of_every_file(trained):
    d = step_dir(trained / "checkpoints" / "base" / "safety", 10)
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "model.pt", "rank_0.pt"]
    meta = json.loads((d / "meta.json").read_text())
    assert set(meta["files"]) == {"model.pt", "rank_0.pt"}
    for name, entry in meta["files"].items():
        data = (d / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    # the rank state (optimizer shard, loader positions, RNG) is plain data: weights_only loads it
    state = torch.load(d / "rank_0.pt", weights_only=True)
    assert {"optimizer", "rng", "loaders"} <= set(state)
    assert "files" not in load_meta(d.parent, 10) and load_meta(d.parent, 10)["step"] == 10


# -----------------------------------------------------------------------------
# planted pickles

@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.pt", "rank_0.pt"])
@pytest.mark.parametrize("forged_manifest", [False, True])
def test_a_planted_pickle_never_runs(trained, tmp_path, capsys, name, forged_manifest):
    root = copy_run(trained)
    d = step_dir(root, 10)
    marker = tmp_path / "pwned"
    torch.save({"x": Plant(marker)}, d / name)
    # the planted file is real: an unsafe load would run it
    torch.load(d / name, weights_only=False)
    assert marker.exists()
    marker.unlink()
    if forged_manifest:  # checksums pass; weights_only is what stops it
        resign(d, name)
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(root, 10, "cpu", rank=0)
    msg = str(e.value)
    assert one_line(msg) and str(d / name) in msg
    assert ("refused" in msg) if forged_manifest else ("sha256" in msg or "bytes" in msg)
    # --resume skips it and continues from step 5
    step, meta, _, _ = load_for_resume(root, True, False, 0, {})
    assert step == 5 and meta["step"] == 5
    assert "skipping checkpoint step 10" in capsys.readouterr().out
    assert not marker.exists()


# -----------------------------------------------------------------------------
# corruption

def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def scramble_middle(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated model.pt": ("model.pt", truncate),
    "random bytes inside model.pt": ("model.pt", scramble_middle),
    "missing rank file": ("rank_0.pt", lambda p: p.unlink()),
    "deleted meta.json": ("meta.json", lambda p: p.unlink()),
    "garbage meta.json": ("meta.json", lambda p: p.write_bytes(os.urandom(200))),
    "edited meta.json": ("meta.json", lambda p: p.write_text(p.read_text().replace('"step": 10', '"step": 11'))),
    "truncated rank file": ("rank_0.pt", truncate),
    "meta.json of 100,000 '['": ("meta.json", lambda p: p.write_text("[" * 100_000)),  # a RecursionError
    "a path as model_tag in meta.json": ("meta.json", lambda p: resign(p.parent, "model.pt",
                                                                       model_tag="x/../../../../PWNED")),
    "meta.json names another step": ("meta.json", lambda p: resign(p.parent, "model.pt", step="../x")),
    "a sparse tensor in model.pt": ("model.pt", plant_sparse),
    "a sparse tensor in the optimizer state": ("rank_0.pt", plant_sparse),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_one_line_and_resume_falls_back(trained, capsys, monkeypatch, case):
    name, corrupt = CORRUPTIONS[case]
    root = copy_run(trained)
    d = step_dir(root, 10)
    size_before = (d / name).stat().st_size
    corrupt(d / name)
    if case == "random bytes inside model.pt":
        assert (d / name).stat().st_size == size_before
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(root, 10, "cpu", rank=0)
    assert one_line(str(e.value)) and str(d / name) in str(e.value)

    step, meta, model_state, rank_state = load_for_resume(root, True, False, 0, {})
    assert step == 5 and rank_state is not None and model_state
    out = capsys.readouterr().out
    assert out.count("skipping checkpoint step 10") == 1 and str(d / name) in out

    # inference loads verify what they read (model.pt, meta.json) and say so in one line
    monkeypatch.setenv("PICOCHAT_HOME", str(trained))
    if name.startswith("rank_"):
        assert load_model("base", root.name, "cpu")[1]["step"] == 10  # the rank file is not needed
    else:
        with pytest.raises(PicochatError) as e:
            load_model("base", root.name, "cpu")
        assert one_line(str(e.value)) and str(d / name) in str(e.value)
    model, meta = load_model("base", root.name, "cpu", step=5)  # an intact step still loads
    assert meta["step"] == 5


@pytest.mark.slow
def test_no_intact_checkpoint_is_a_one_line_error(trained):
    root = copy_run(trained)
    for step in list_steps(root):
        scramble_middle(step_dir(root, step) / "model.pt")
    with pytest.raises(PicochatError) as e:
        load_for_resume(root, False, True, 0, {})
    assert one_line(str(e.value)) and "none of the 2 checkpoint(s)" in str(e.value)
    # and through the CLI: no traceback, one line on stderr
    proc = picochat(trained, "base_train", *TRAIN, "--model-tag", root.name, "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "is intact" in errors[0], proc.stderr


@pytest.mark.slow
def test_resume_falls_back_and_drops_a_torn_metrics_line(trained):
    """Through the CLI: the newest checkpoint has random bytes in model.pt and the last metrics line
    is torn; --resume skips step 10, warns about the line, and retraces the original run exactly."""
    root = copy_run(trained)
    scramble_middle(step_dir(root, 10) / "model.pt")
    with open(root / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 3.1')  # a write cut short by a full disk
    proc = picochat(trained, "base_train", *TRAIN, "--model-tag", root.name, "--resume")
    assert "skipping checkpoint step 10" in proc.stdout and "model.pt" in proc.stdout
    assert "resumed from step 5" in proc.stdout
    assert "unreadable" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert losses(trained, root.name) == losses(trained, "safety")  # bit for bit
    load_checkpoint(root, 10, "cpu", rank=0)  # step 10 was written again, intact


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.9}, {"step": 2, "val_bpb": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')
    assert run_is_complete(path, 2)  # the last readable line decides
    assert "line 4" in capsys.readouterr().out
    truncate_metrics(path, 2)
    assert "unreadable" in capsys.readouterr().out
    assert [json.loads(l) for l in path.read_text().splitlines()] == lines
    path.write_text('{"step": 1}\nnot json\n\xff\xfe\n{"step": 2}\n')  # any bad line, anywhere
    truncate_metrics(path, 5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.slow
def test_a_stray_file_named_like_a_step_is_not_a_checkpoint(trained, monkeypatch):
    root = copy_run(trained)
    (root / "step_000099").write_text("not a checkpoint")
    (root / "step_000098").symlink_to("/etc/hostname")
    assert list_steps(root) == [5, 10]
    step, meta, _, _ = load_for_resume(root, True, False, 0, {})
    assert step == 10 and meta["step"] == 10
    monkeypatch.setenv("PICOCHAT_HOME", str(trained))
    assert load_model("base", root.name, "cpu")[1]["step"] == 10


@pytest.mark.slow
def test_a_path_as_model_tag_in_meta_json_writes_nothing_outside_home(trained, monkeypatch):
    """A handed-over checkpoint whose meta.json (manifest recomputed) names its tag
    x/../../../../PWNED: base_eval used to write its results there, outside $PICOCHAT_HOME."""
    root = copy_run(trained)
    marker = f"PWNED{uuid.uuid4().hex[:8]}"
    evil = "x/../../../../" + marker
    for step in list_steps(root):
        resign(step_dir(root, step), "model.pt", model_tag=evil)
    target = os.path.normpath(trained / "evals" / f"base_{evil}_step000010.json")
    proc = picochat(trained, "base_eval", "--model-tag", root.name, "--eval", "sample", "--max-new-tokens", "2",
                    "--num-unconditioned", "0", "--device", "cpu", "--dtype", "float32", check=False)
    if os.path.exists(target):
        os.unlink(target)
        raise AssertionError(f"base_eval wrote outside $PICOCHAT_HOME: {target}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "model_tag" in errors[0] and "is not a valid name" in errors[0], proc.stderr
    # the tag from the directory, a name, is what a loaded model carries
    (root / "step_000010" / "meta.json").write_text((step_dir(trained / "checkpoints" / "base" / "safety", 10)
                                                     / "meta.json").read_text())
    monkeypatch.setenv("PICOCHAT_HOME", str(trained))
    assert load_model("base", root.name, "cpu")[1]["model_tag"] == root.name


# -----------------------------------------------------------------------------
# full disk

def tiny_state(seed):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 256, generator=gen)}  # 64 KiB


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    save_checkpoint(root, 1, tiny_state(1), {"step": 1}, {"rng": torch.get_rng_state()}, keep_last=1)
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the bytes went out, then the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(PicochatError) as e:
        save_checkpoint(root, 2, tiny_state(2), {"step": 2}, {"rng": torch.get_rng_state()}, keep_last=1)
    monkeypatch.undo()
    assert "no space left on" in str(e.value) and one_line(str(e.value))
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]  # tmp removed, nothing pruned
    state, meta, rank = load_checkpoint(root, 1, "cpu", rank=0)
    assert torch.equal(state["w"], tiny_state(1)["w"]) and meta["step"] == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_real_full_disk_says_so_and_keeps_the_previous_checkpoint(small_tmpfs):
    root = small_tmpfs / "ckpts"
    save_checkpoint(root, 1, tiny_state(1), {"step": 1}, {}, keep_last=1)  # ~70 KiB of 256
    big = {"w": torch.zeros(64 * 1024)}  # 256 KiB: cannot fit
    with pytest.raises(PicochatError) as e:
        save_checkpoint(root, 2, big, {"step": 2}, {}, keep_last=1)
    assert "no space left on" in str(e.value) and one_line(str(e.value))
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]
    state, meta, _ = load_checkpoint(root, 1, "cpu", rank=0)
    assert torch.equal(state["w"], tiny_state(1)["w"])


# -----------------------------------------------------------------------------
# model tags

@pytest.mark.parametrize("tag", ["../../x", "..", ".", ".hidden", "a/b", "/abs", "", "x" * 101, "a\nb", "a b"])
def test_a_tag_that_is_not_a_name_is_refused(tag):
    with pytest.raises(PicochatError) as e:
        checkpoint_dir("base", tag)
    assert one_line(str(e.value))


@pytest.mark.parametrize("tag", ["d20", "my-run_2.1", "x" * 100, "_a", "v1.0"])
def test_plain_names_are_tags(tag):
    assert check_model_tag(tag) == tag and checkpoint_dir("base", tag).name == tag


@pytest.mark.slow
@pytest.mark.parametrize("stage,flag", [("base_train", "--model-tag"), ("sft", "--model-tag"),
                                        ("sft", "--source-tag")])
def test_a_path_as_model_tag_is_one_line_and_writes_nothing_outside_home(tmp_path, stage, flag):
    home = tmp_path / "a" / "home"
    home.mkdir(parents=True)
    proc = picochat(home, stage, "--device", "cpu", flag, "../../x", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{flag} '../../x' is not a valid name" in errors[0], proc.stderr
    outside = [p for p in tmp_path.rglob("*") if home not in p.parents and p != home]
    assert sorted(outside) == [tmp_path / "a"]
