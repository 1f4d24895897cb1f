"""Incremental detokenization to valid UTF-8, and stop strings matched on the text.

A byte-level BPE token may hold part of a multi-byte character; text is released only once the bytes
decode cleanly. Text that could be the beginning of a stop string is held back until it is known not to be.
With `after_reasoning`, stop strings match only after the reasoning an R1 reply opens with, `<think> ... </think>`.
"""

from __future__ import annotations

from seekstack.tokenizer import THINK_CLOSE, THINK_OPEN, Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


class TextStream:
    """Feed generated token ids one at a time; get back the text that is safe to show."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = False,
        enabled: bool = True,
        after_reasoning: str | None = None,
        include_stop: bool = False,
        min_tokens: int = 0,
    ):
        self.tokenizer, self.stop, self.enabled = tokenizer, stop, enabled  # not enabled: every call gives no text
        self.min_tokens, self.pushed = min_tokens, 0  # stop strings match from the min_tokens-th token on (vLLM's)
        self.include_stop = include_stop  # the stop string found ends the shown text (include_stop_str_in_output)
        self.after_reasoning = after_reasoning  # the reply's given start (a chat prefix, "" for none), or None: off
        self.longest_stop = max((len(text) for text in stop), default=0)
        self.skipped_ids = tokenizer.special_ids if skip_special_tokens else frozenset()
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already taken into `text`
        self.read_offset = 0
        self.prefix_text = ""  # the text of ids[prefix_offset:read_offset]
        self.text = ""  # all complete text so far, stop strings included
        self.released = 0  # characters of `text` handed out
        self.matched_stop: str | None = None  # the stop string that ended the text, once one has

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text newly safe to show, whether a stop string has now appeared)."""
        self.pushed += 1
        if token_id in self.skipped_ids or not self.enabled:
            return "", False
        self.ids.append(token_id)
        new_text = self.held_text()
        if new_text and not new_text.endswith(REPLACEMENT):
            self.text += new_text
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            # Decoded alone, as the next token's decode reads it: a decoder need not spell a token first as it did
            # after others (SentencePiece's drops a first ▁, a tokenizer without one joins tokens with spaces).
            self.prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        return self._release()

    def held_text(self) -> str:
        """The text ids[read_offset:] add after the prefix's, decoded in its context (bytes of one character may
        be split between tokens): lossily, a part of a character reads as one U+FFFD, so it is not yet safe to show
        (`push` releases it once it decodes cleanly)."""
        return self.tokenizer.decode(self.ids[self.prefix_offset :])[len(self.prefix_text) :]

    def flush(self) -> str:
        """At the end without a stop string: everything not yet shown, incomplete bytes as U+FFFD."""
        if not self.enabled:
            return ""
        self.text += self.held_text()
        self.prefix_offset = self.read_offset = len(self.ids)
        self.prefix_text = ""
        out, self.released = self.text[self.released :], len(self.text)
        return out

    def _release(self) -> tuple[str, bool]:
        # Released text never ends with the start of a stop string, so a stop string can only begin after it: each
        # token costs a search of the unreleased tail (at most the longest stop string plus the new text), not of all.
        if not self.stop:
            out, self.released = self.text[self.released :], len(self.text)
            return out, False
        start = self._stops_start()
        if start is None:
            return "", False
        start = max(self.released, start)
        found = [(index, stop) for stop in self.stop if (index := self.text.find(stop, start)) >= 0]
        if self.pushed < self.min_tokens:  # a stop string found before is released as text, as vLLM's
            found = []
        if found:
            index, stop = min(found, key=lambda hit: hit[0])  # the first to appear (of two there, the first given)
            end = index + len(stop) if self.include_stop else index
            self.matched_stop = stop
        else:
            end = len(self.text) - self._held_back(start)
        out, self.released = self.text[self.released : end], end
        return out, bool(found)

    def _stops_start(self) -> int | None:
        """Where in `text` a stop string may begin: anywhere (0), or with `after_reasoning` in a reply that opens with
        <think> (its given start, then `text`), past its first </think> (past the text so far while it has none); None
        while the opening may still be <think>."""
        if self.after_reasoning is None:
            return 0
        reply = self.after_reasoning + self.text
        opening = reply.lstrip()
        if not opening.startswith(THINK_OPEN):
            return None if THINK_OPEN.startswith(opening) else 0
        close = reply.find(THINK_CLOSE)
        return len(self.text) if close < 0 else max(close + len(THINK_CLOSE) - len(self.after_reasoning), 0)

    def _held_back(self, start: int) -> int:
        """Length of the longest tail of the text from `start` that is a proper prefix of a stop string."""
        tail = self.text[max(start, len(self.text) - self.longest_stop + 1) :]
        longest = 0
        for stop in self.stop:
            start = tail.find(stop[0])
            while 0 <= start < len(tail) - longest:  # candidates begin where the stop string's first character is
                if stop.startswith(tail[start:]):
                    longest = len(tail) - start
                    break
                start = tail.find(stop[0], start + 1)
        return longest
