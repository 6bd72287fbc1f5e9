"""
What a person sees of a reply: ANSI colours only on a terminal, and never with NO_COLOR
(common.color_enabled).

    pytest -q tests/test_display.py
"""
from __future__ import annotations

import io

from picochat.common import color_enabled


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert color_enabled(Terminal()) and not color_enabled(io.StringIO()) and not color_enabled(object())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not color_enabled(Terminal())
    monkeypatch.setenv("NO_COLOR", "")  # no-color.org: set and empty does not count
    assert color_enabled(Terminal())
