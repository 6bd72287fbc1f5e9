"""
The report card: every section is there, the summary table holds exactly the numbers the evals
wrote ("–" where a stage or task did not run), the plots are real PNGs linked from the markdown,
wall time comes from the run log, and the run log itself is written by the CLI without ever
failing a stage. The last test runs a tiny pipeline through the `picochat` CLI and reports on it.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from picochat.__main__ import main as picochat_main
from picochat.evals.chat_eval import wilson_interval
from picochat.report import log_run, write_report
from stagerun import picochat

SECTIONS = ["Summary", "Plots", "Environment", "Data and splits", "Run log", "Tokenizer",
            "Base model training", "Base model evaluation", "Chat evaluation BASE", "Midtraining",
            "Chat evaluation MID", "SFT", "Chat evaluation SFT", "Reinforcement learning", "Chat evaluation RL"]
PLOTS = ["report_train_loss.png", "report_val_bpb.png", "report_eval_scores.png"]
CONFIG = {"sequence_len": 64, "vocab_size": 512, "n_layer": 2, "n_head": 1, "n_kv_head": 1, "n_embd": 128}


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def fabricate_stage(home, stage, tag, steps, batch, source=None, mixture=None):
    root = home / "checkpoints" / stage / tag
    records = [{"step": 0, "val_bpb": 3.0}] if stage == "base" else []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 5.0 / s, "dt": 0.5, "tok_per_sec": 2 * batch, "time": 0.5 * s}
        r |= {"tokens": s * batch, "mfu": 0.01} if stage == "base" else {"supervised_tokens": batch // 2}
        if s % 2 == 0:
            r["val_bpb"] = 2.0 / s
        records.append(r)
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    user_config = {"model_tag": tag, "depth": 2, "resume": False}
    user_config |= {"dataset": "tiny"} if stage == "base" else {"mixture": mixture}
    meta = {"step": steps, "model_config": CONFIG, "user_config": user_config, "compute_dtype": "float32",
            "world_size": 1, "total_batch_size": batch, "max_seq_len": 64,
            "loop": {"total_time": 0.5 * steps, "last_metrics": records[-1]}}
    if source:
        meta["source"] = {"stage": source[0], "tag": source[1], "step": source[2]}
    write_json(root / f"step_{steps:06d}" / "meta.json", meta)


@pytest.fixture
def fabricated_run(home):
    """A demo-like run: base 4 steps → mid 4 → sft 2, evals of base (CORE-offline), mid and sft,
    and a run log; plus a newer, unrelated base model that the report must not pick."""
    fabricate_stage(home, "base", "t", 4, 512)
    fabricate_stage(home, "mid", "t", 4, 512, source=("base", "t", 4), mixture="demo")
    fabricate_stage(home, "sft", "t", 2, 256, source=("mid", "t", 4), mixture="demo")
    fabricate_stage(home, "base", "zzunrelated", 2, 512)
    os.utime(home / "checkpoints" / "base" / "zzunrelated", (2e9, 2e9))  # the newest base tag
    core = {"metric": "CORE-offline", "tasks_run": 13, "tasks_total": 22, "score": 0.0123,
            "tasks": {"hellaswag_zeroshot": {"accuracy": 0.26, "centered": 0.0133, "examples": 100,
                                             "random_baseline": 25.0}}}
    write_json(home / "evals" / "base_t_step000004.json",
               {"model_tag": "t", "step": 4, "dataset": "tiny", "train_bpb": 1.5, "val_bpb": 1.6,
                "samples": {"The king": " is here"}, "core": core})
    write_json(home / "evals" / "base_zzunrelated_step000002.json",
               {"model_tag": "zzunrelated", "step": 2, "train_bpb": 9.0, "val_bpb": 9.0,
                "core": {"metric": "CORE", "score": 0.9}})
    write_json(home / "evals" / "chat_base_t_step000004.json",
               {"source": "base", "model_tag": "t", "step": 4, "results": {"SpellingBee": 0.0}, "chatcore": None})
    write_json(home / "evals" / "chat_mid_t_step000004.json",
               {"source": "mid", "model_tag": "t", "step": 4, "chatcore": 0.0512,
                "results": {"ARC-Easy": 0.3125, "ARC-Challenge": 0.28, "MMLU": 0.2711, "GSM8K": 0.0,
                            "HumanEval": 0.0122, "SpellingBee": 0.25}})
    write_json(home / "evals" / "chat_sft_t_step000002.json",
               {"source": "sft", "model_tag": "t", "step": 2, "chatcore": None,
                "results": {"ARC-Easy": 0.375, "SpellingBee": 0.5, "SpellingBee_chance": 0.4},
                "everyday": {"prompts": 50, "topic_on_topic": 0.45, "passed": 0.36},
                "everyday_samples": [["Hi", "Hello! How can I help?"]]})
    runs = [("tok_train", "00:00:00", "00:01:00"), ("base_train", "00:01:00", "00:02:30"),
            ("mid_train", "00:03:00", "00:03:40"), ("chat", "05:00:00", "09:00:00")]  # chat: not the run's time
    (home / "report").mkdir(parents=True)
    (home / "report" / "runs.jsonl").write_text("".join(
        json.dumps({"stage": s, "argv": ["--depth", "2"], "start": f"2026-01-01T{a}+00:00",
                    "end": f"2026-01-01T{b}+00:00", "duration_s": 1.0, "exit_code": 0, "hostname": "h"}) + "\n"
        for s, a, b in runs))
    return home


def summary_table(text: str) -> dict[str, list[str]]:
    block = text.split("## Summary")[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
    assert rows[0] == ["Metric", "BASE", "MID", "SFT", "RL"]
    return {r[0]: r[1:] for r in rows[2:]}


def assert_is_png(path):
    from PIL import Image
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    with Image.open(path) as im:
        im.load()
        assert im.width > 100 and im.height > 100


def test_report_has_every_section_and_the_exact_numbers_of_the_evals(fabricated_run):
    path = write_report()
    assert path == fabricated_run / "report" / "report.md"
    text = path.read_text()
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS
    assert summary_table(text) == {
        "CORE-offline (13 of 22 tasks)": ["0.0123", "–", "–", "–"],
        "ARC-Easy": ["–", "0.3125", "0.3750", "–"],
        "ARC-Challenge": ["–", "0.2800", "–", "–"],
        "MMLU": ["–", "0.2711", "–", "–"],
        "GSM8K": ["–", "0.0000", "–", "–"],
        "HumanEval": ["–", "0.0122", "–", "–"],
        "SpellingBee": ["0.0000", "0.2500", "0.5000", "–"],
        "ChatCORE": ["–", "0.0512", "–", "–"],
        "Everyday": ["–", "–", "0.3600 (0.24–0.50)", "–"],  # the share of its 50 prompts passed
    }
    # the chain sft t → mid t → base t, not the newest base tag
    assert "base `t` step 4, mid `t` step 4, sft `t` step 2" in text and "zzunrelated" not in text
    assert "trains only on validation/dev splits and evaluates on test splits" in text
    assert "| hellaswag_zeroshot | 0.2600 |" in text  # CORE per task
    assert "| tokens trained on | 2,048 |" in text  # base: 4 steps × 512
    assert "| min val bpb | 0.5000 |" in text  # base: 2.0 / 4
    # wall time: the three pipeline stages (1m + 1m30s + 40s), not the chat session hours later
    assert "total wall clock time: 3m10s" in text
    assert "$0 (CPU only" in text  # the test machine has no GPU
    for name in PLOTS:
        assert f"]({name})" in text
        assert_is_png(path.parent / name)


def test_cost_is_wall_time_times_the_hourly_price_of_the_gpus(fabricated_run, monkeypatch):
    import picochat.report
    monkeypatch.setattr(picochat.report, "gpus", lambda: [("NVIDIA H100 80GB HBM3", 79.2)] * 8)
    text = write_report().read_text()
    assert "| GPUs | 8 × NVIDIA H100 80GB HBM3 |" in text
    # 3m10s of stages at 8 × $3.00 per hour
    assert f"estimated cost: ${8 * 3.00 * 190 / 3600:,.2f} ($24.00/hour for 8 GPU(s))" in text


def test_report_writes_where_asked_and_labels_full_core_plainly(fabricated_run, tmp_path):
    out = write_report(tmp_path / "out" / "card.md", model_tag="zzunrelated")
    text = out.read_text()
    assert summary_table(text)["CORE"] == ["0.9000", "–", "–", "–"]
    assert "Not run." in text.split("## Midtraining")[1]
    for name in ("card_train_loss.png", "card_val_bpb.png", "card_eval_scores.png"):
        assert_is_png(out.parent / name)


def test_report_without_checkpoints_says_what_to_run_first(home, capsys):
    assert picochat_main(["report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoints" in err and "base_train" in err


def test_every_stage_run_is_logged_with_its_exit_code(fabricated_run):
    log = fabricated_run / "report" / "runs.jsonl"
    log.unlink()
    assert picochat_main(["report"]) == 0
    assert picochat_main(["report", "--model-tag", "nope"]) == 2
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["stage"], r["argv"], r["exit_code"]) for r in records] == [
        ("report", [], 0), ("report", ["--model-tag", "nope"], 2)]
    assert all(r["start"] <= r["end"] and r["duration_s"] >= 0 and r["hostname"] for r in records)


def test_only_rank_zero_writes_the_run_log(home, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    log_run("base_train", [], 0.0, 1.0, 0)
    assert not (home / "report" / "runs.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    log_run("base_train", [], 0.0, 1.0, 0)
    assert (home / "report" / "runs.jsonl").read_text().count("\n") == 1


def test_a_run_log_that_cannot_be_written_does_not_fail_the_stage(fabricated_run, capsys):
    shutil.rmtree(fabricated_run / "report")
    (fabricated_run / "report").write_text("a file where the report directory should be")
    assert picochat_main(["report", "--output", str(fabricated_run / "card.md")]) == 0
    assert "could not append to the run log" in capsys.readouterr().err
    assert (fabricated_run / "card.md").exists()


# -----------------------------------------------------------------------------
# End to end through the CLI

CPU = ["--dtype", "float32", "--device", "cpu"]


@pytest.mark.slow
def test_report_of_a_tiny_pipeline_run_through_the_cli(tiny_home, tmp_path, monkeypatch):
    home = tmp_path / "home"  # a home of our own: other tests train in tiny_home
    for part in ("data", "tokenizer"):
        shutil.copytree(tiny_home / part, home / part)
    from picochat.common import PicochatError
    from picochat.tasks import offline
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    try:
        offline.fetch_wheel("english-words")  # SpellingBee's words, for chat_eval
    except PicochatError as e:
        pytest.skip(f"english-words wheel not available from PyPI: {e}")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                      {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                             for i in range(40)))
    picochat(home, "base_train", "--dataset", "tiny", "--depth", "2", "--max-seq-len", "64",
             "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "6",
             "--eval-every", "3", "--eval-tokens", "1024", "--sample-every", "-1", "--model-tag", "e2e", *CPU)
    picochat(home, "base_eval", "--eval", "bpb,sample", "--dataset", "tiny", "--eval-tokens", "512", "--device-batch-size", "4",
             "--max-new-tokens", "4", "--num-unconditioned", "1", *CPU)
    for stage, source in (("mid_train", "base"), ("sft", "mid")):
        picochat(home, stage, "--mixture", str(chats), "--source", source, "--device-batch-size", "4",
                 "--total-batch-size", "512", "--num-iterations", "3", "--eval-every", "-1",
                 "--eval-tokens", "512", *CPU)
    earlier = home / "evals" / "chat_sft_e2e_step000003.json"  # an earlier chat_eval of this checkpoint
    earlier.parent.mkdir(parents=True, exist_ok=True)
    earlier.write_text(json.dumps({"results": {"ARC-Easy": 0.5}, "problems": {"ARC-Easy": 10}}))
    picochat(home, "chat_eval", "--source", "sft", "-a", "SpellingBee", "--max-problems", "2",
             "--max-new-tokens", "8", *CPU)
    merged = json.loads(earlier.read_text())  # a run of one task keeps the others' scores
    assert merged["results"]["ARC-Easy"] == 0.5 and "SpellingBee" in merged["results"]
    assert merged["problems"] == {"ARC-Easy": 10, "SpellingBee": 2}
    out = picochat(home, "report").stdout
    path = home / "report" / "report.md"
    assert str(path) in out
    text = path.read_text()
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    sft_eval = json.loads(next((home / "evals").glob("chat_sft_e2e_step*.json")).read_text())
    table = summary_table(text)
    # each accuracy with its 95% interval over the problems run (2 and 10 here)
    lo, hi = wilson_interval(sft_eval['results']['SpellingBee'], 2)
    assert table["SpellingBee"] == ["–", "–", f"{sft_eval['results']['SpellingBee']:.4f} ({lo:.2f}–{hi:.2f})", "–"]
    assert table["ARC-Easy"] == ["–", "–", "0.5000 (0.24–0.76)", "–"]
    assert table["CORE"] == ["–"] * 4  # CORE was not asked for (--eval bpb,sample)
    log_rows = [line for line in text.split("## Run log")[1].split("## ")[0].splitlines() if line.startswith("| 20")]
    logged = [line.split("|")[2].strip() for line in log_rows]
    assert logged == ["base_train", "base_eval", "mid_train", "sft", "chat_eval"]
    assert "total wall clock time" in text and "from the run log" in text
    assert f"val bpb | {json.loads(next((home / 'evals').glob('base_e2e_*.json')).read_text())['val_bpb']:.4f}" in text
    for name in PLOTS:
        assert_is_png(home / "report" / name)


def test_core_label_says_when_the_score_is_not_the_full_22_task_metric():
    from picochat.report import core_label
    assert core_label({"metric": "CORE", "tasks_run": 22, "tasks_total": 22}) == "CORE"
    assert core_label({"metric": "CORE-subset", "tasks_run": 3, "tasks_total": 22}) == "CORE-subset (3 of 22 tasks)"
    assert core_label({"metric": "CORE-offline", "tasks_run": 14, "tasks_total": 22}) == "CORE-offline (14 of 22 tasks)"


def test_secrets_and_private_prompts_never_reach_the_run_log(home):
    from picochat.report import log_run, read_log, run_log_path
    log_run("base_eval", ["--api-key", "SECRET1", "--token=SECRET2", "--model-tag", "d4"], 0.0, 1.0, 0)
    log_run("serve", ["--api-key", "SECRET3"], 0.0, 1.0, 0)
    log_run("chat", ["-p", "my private question"], 0.0, 1.0, 0)
    text = run_log_path().read_text()
    assert "SECRET" not in text and "private" not in text
    assert [r["argv"] for r in read_log(run_log_path())] == [["--api-key", "***", "--token=***", "--model-tag", "d4"]]


def test_sft_trained_straight_from_base_reports_no_unrelated_mid_model(home):
    # "zzother" names the other chain: a word no commit message quoted in the report holds by chance
    fabricate_stage(home, "base", "b", 4, 512)
    fabricate_stage(home, "mid", "zzother", 4, 512, source=("base", "zzother", 4), mixture="demo")
    fabricate_stage(home, "sft", "b", 2, 256, source=("base", "b", 4), mixture="demo")
    os.utime(home / "checkpoints" / "mid" / "zzother", (2e9, 2e9))
    text = write_report().read_text()
    assert "base `b` step 4, sft `b` step 2" in text and "zzother" not in text
    fabricate_stage(home, "mid", "b", 4, 512, source=("base", "zzother", 4), mixture="demo")  # same tag, other chain
    text = write_report(model_tag="b").read_text()
    assert "base `b` step 4, sft `b` step 2" in text and "mid `b`" not in text


def test_an_rl_run_fills_the_rl_column_and_plots_reward_and_pass_at_k(fabricated_run):
    home = fabricated_run
    root = home / "checkpoints" / "rl" / "t"
    records = [{"step": 0, "pass@1": 0.25, "pass@4": 0.5}]
    records += [{"step": s, "loss": -0.01, "reward": 0.1 * s, "progress": s / 4} for s in range(1, 5)]
    records[-1] |= {"pass@1": 0.5, "pass@4": 0.75}
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_json(root / "step_000004" / "meta.json", {
        "step": 4, "model_config": CONFIG, "user_config": {"task": "SpellingBee"}, "world_size": 1,
        "source": {"stage": "sft", "tag": "t", "step": 2}, "loop": {"total_time": 2.0},
        "rollout": {"tasks": ["SpellingBee"], "prompts_per_step": 16, "num_samples": 16}})
    write_json(home / "evals" / "chat_rl_t_step000004.json",
               {"source": "rl", "model_tag": "t", "step": 4, "chatcore": None,
                "results": {"SpellingBee": 0.95}, "problems": {"SpellingBee": 256}})
    text = write_report().read_text()
    assert summary_table(text)["SpellingBee"] == ["0.0000", "0.2500", "0.5000", "0.9500 (0.92–0.97)"]
    rl = text.split("\n## Reinforcement learning\n")[1].split("\n## ")[0]
    assert "| 16 problems × 16 samples |" in rl and "| mean reward, last 10 steps | 0.2500 |" in rl
    assert "| pass@k at step 4 | pass@1 0.5000, pass@4 0.7500 |" in rl
    assert_is_png(home / "report" / "report_rl.png")
