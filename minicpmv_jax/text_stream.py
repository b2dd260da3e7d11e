"""Answer text as tokens arrive: incremental decoding, stop strings, and the answer's stripped whitespace.

Host-side (the tokenizer, no JAX). ``chat(stream=True)`` and the serving engine both stream an answer
through :class:`AnswerStream`, so that the pieces they yield join to exactly the text the non-streamed
``chat`` returns: ``tokenizer.decode(ids without the final stop token).strip()``, cut before the first
stop string if any were given (OpenAI's ``stop``; the stop string itself is not part of the answer).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["StripStream", "StopStrings", "AnswerStream"]


class StripStream:
    """Streams text with surrounding whitespace removed, as ``str.strip`` would on the whole."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""  # trailing whitespace not yet known to be inner

    def feed(self, piece: str, last: bool = False) -> str:
        """The part of ``piece`` that is certainly in the stripped text (``last``: nothing follows)."""
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        text = self._held + piece
        body = text.rstrip()
        self._held = "" if last else text[len(body):]
        return body


class StopStrings:
    """Cuts a text stream before the first occurrence of any stop string.

    Text that could still be the start of a stop string is held back until the next piece decides.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""      # everything fed, up to the match
        self._emitted = 0
        self.matched: str | None = None

    def feed(self, piece: str, last: bool = False) -> str:
        """The newly released text; after a match, nothing more."""
        if self.matched is not None:
            return ""
        self._text += piece
        hits = [(i, s) for s in self._stops if (i := self._text.find(s, max(0, self._emitted - len(s)))) >= 0]
        if hits:
            end, self.matched = min(hits)
            self._text = self._text[:end]
            last = True
        cut = len(self._text) if last else max(self._emitted, len(self._text) - self._hold)
        out = self._text[self._emitted:cut]
        self._emitted = cut
        return out


class AnswerStream:
    """Token ids in, answer text out: ``feed(token)`` per generated token, ``finish()`` once at the end.

    The final stop token (one of ``stop_ids``) is not decoded; ``stopped`` becomes True when a stop string
    matched (the caller ends the request there).
    """

    def __init__(self, tokenizer, stop_ids: Sequence[int], stop_strings: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._stop_ids = frozenset(int(i) for i in stop_ids)
        self._stops = StopStrings(stop_strings)
        self._strip = StripStream()
        self._finished = False

    @property
    def stopped(self) -> bool:
        """A stop string matched: the answer is complete."""
        return self._stops.matched is not None

    def feed(self, token: int, last: bool = False) -> str:
        """One generated token (``last``: the request's final token, which may be a stop id) → new text."""
        if self._finished:
            raise RuntimeError("AnswerStream.feed after finish()")
        if last and int(token) in self._stop_ids:
            return self.finish()
        text = self._strip.feed(self._stops.feed(self._decoder.step(int(token))))
        return text + self.finish() if last else text

    def finish(self) -> str:
        """Releases the held-back text; the stream ends."""
        if self._finished:
            return ""
        self._finished = True
        return self._strip.feed(self._stops.feed(self._decoder.flush(), last=True), last=True)
