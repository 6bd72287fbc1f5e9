"""
Tests for picochat/common.py: progress bars in logs, seeding, the stage → checkpoint mapping.
"""
import io
import random

import numpy as np
import pytest
import torch

from picochat.common import COMMAND_OF_STAGE, checkpoint_dir, progress_bar, seed_everything


def test_a_progress_bar_in_a_log_prints_a_few_plain_lines_not_carriage_return_frames():
    log = io.StringIO()  # not a terminal, like stderr redirected to a speedrun log
    with progress_bar(total=1000, desc="reading", file=log, mininterval=0) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 3 <= len(lines) <= 12, lines  # the start, every 10%, the end
    assert lines[0].startswith("reading:   0%") and lines[-1].startswith("reading: 100%")
    assert "1000/1000" in lines[-1]


def test_seed_everything_seeds_python_numpy_and_torch():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    seed_everything(3)
    first = draw()
    seed_everything(3)
    assert draw() == first


def test_checkpoint_directories_are_named_by_stage_and_commands_by_what_they_do():
    assert COMMAND_OF_STAGE["mid"] == "mid_train" and checkpoint_dir("mid", "d4").parts[-2:] == ("mid", "d4")
    with pytest.raises(ValueError, match="unknown checkpoint stage 'mid_train'"):
        checkpoint_dir("mid_train", "d4")
