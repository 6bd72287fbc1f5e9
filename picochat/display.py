"""
What a person sees of a model's reply: its text without the answer marker the math tasks train.

GSM8K, Arithmetic and SpellingBee teach the model to end a reply with a line '#### 18', so that a
checker can read the answer (picochat/tasks/gsm8k.py). A person has the answer already, in the
words before it, and the marker reads as noise (or, on a web page, as a markdown heading).
`displayed_text` is what `picochat chat`, the API's replies and so the web page show; the tokens
keep the marker: the chat history the model sees, chat_eval and RL read the raw text.

A marker is '####', a number as the checker reads it, and nothing else to the end of its line or
of the text; the blank space before it goes with it. '#### Notes' (a heading) and '#### 18 apples'
stay.

A streamed reply comes a token at a time, and a '#' may begin a marker or a heading: `DisplayStream`
holds back the tail that could still turn out to be a marker until the next text decides it. What it
lets through, joined, is displayed_text of the whole reply, however the reply is cut into pieces
(tests/test_display.py cuts replies at every point).

    displayed_text("12 * 7 = 84\\n#### 84")       # '12 * 7 = 84'
    shown = DisplayStream()
    shown.feed("= 84\\n##") + shown.feed("## 84") + shown.finish()   # '= 84'
"""
from __future__ import annotations

import re

# The number after '####' as tasks/gsm8k.py's ANSWER reads it, up to 20 digits and 8 decimals.
NUMBER = r"-?\d[\d,]{0,19}(?:\.\d{1,8})?"
BLANKS = r"[ \t]{0,3}"
# '####' (not after a '#': '##### 5' is markdown), the number, then the end of the line. Bounded, so
# that a stream holds back a few characters at most and no match costs more than a few steps.
_MARKER = r"(?<!#)####" + BLANKS + r"(?:\$" + BLANKS + r")?" + NUMBER + BLANKS
MARKER = re.compile(_MARKER + r"(?=\n|\Z)")
MARKER_BEFORE_NEWLINE = re.compile(_MARKER + r"(?=\n)")  # decided while more text may follow
# The beginning of a marker, which more text may complete.
PARTIAL = re.compile(r"#{0,3}|####" + BLANKS + r"(?:\$" + BLANKS + r")?(?:(?:-|-?\d[\d,]{0,19}(?:\.\d{0,8})?)"
                     + BLANKS + r")?")


def displayed_text(text: str) -> str:
    """The reply's text as a person sees it: every answer marker, with the blank space before it, cut."""
    shown, end = [], 0
    for marker in MARKER.finditer(text):
        shown.append(text[end:marker.start()].rstrip())
        end = marker.end()
    return "".join(shown) + text[end:]


class DisplayStream:
    """displayed_text for text that arrives in pieces: `feed` returns what can be shown now, holding
    back a tail that may still become a marker; `finish` returns the rest when the text has ended
    (the reply's end, or a tool block: text on either side of one is not contiguous)."""

    def __init__(self):
        self.held = ""

    def feed(self, text: str) -> str:
        pending, shown = self.held + text, []
        while True:
            # a marker may begin at the blank space before the first '#' (or, with none, at the end)
            first = pending.find("#")
            first = len(pending) if first < 0 else first
            start = len(pending[:first].rstrip())
            shown.append(pending[:start])
            blank, rest = pending[start:first], pending[first:]
            if marker := MARKER_BEFORE_NEWLINE.match(rest):
                pending = rest[marker.end():]  # a whole marker, its newline come: cut, with the blank before it
            elif PARTIAL.fullmatch(rest):
                self.held = blank + rest  # undecided until more text comes (or none)
                return "".join(shown)
            else:  # the blank and the '#'s begin no marker: shown, once the '#'s have ended
                hashes = len(rest) - len(rest.lstrip("#"))
                if hashes == len(rest):  # five '#'s or more, and more may come: none begins a marker
                    self.held = blank + rest
                    return "".join(shown)
                shown.append(blank + rest[:hashes])
                pending = rest[hashes:]

    def finish(self) -> str:
        text, self.held = displayed_text(self.held), ""
        return text
