"""Streaming answer text: stripped whitespace, stop strings, and the join equal to the whole answer."""

import pytest

from minicpmv_jax.text_stream import AnswerStream, StopStrings, StripStream


def test_strip_stream_strips_like_the_answer():
    strip = StripStream()
    pieces = ["  ", "\n a", "b ", " ", "c", "  \n", ""]
    out = [strip.feed(p) for p in pieces] + [strip.feed("", last=True)]
    assert "".join(out) == "".join(pieces).strip()


@pytest.mark.parametrize("stops, want, matched", [
    (("END",), "Hello wor", None),                      # no match: everything, once finished
    (("wor",), "Hello ", "wor"),
    (("lo w", "x"), "Hel", "lo w"),
    (("o", "Hello"), "", "Hello"),                       # the earliest match wins
    (("ld",), "Hello wor", None),
])
def test_stop_strings_cut_before_the_first_match(stops, want, matched):
    pieces = ["He", "l", "lo w", "o", "r"]
    stream = StopStrings(stops)
    out = [stream.feed(p) for p in pieces] + [stream.feed("", last=True)]
    assert "".join(out) == want and stream.matched == matched
    # nothing that could start a stop string is released before it is decided
    released = ""
    stream = StopStrings(("lo w",))
    for p in pieces:
        released += stream.feed(p)
        assert "lo w".startswith(released[len("Hel"):]) or len(released) <= len("Hel")


def test_answer_stream_joins_to_the_decoded_answer(tiny_processor):
    tok = tiny_processor.tokenizer
    ids = tok.encode("  Un café, s'il vous plaît 🙂  ")
    stop = tok.stop_ids[0]
    stream = AnswerStream(tok, tok.stop_ids)
    pieces = [stream.feed(t) for t in ids] + [stream.feed(stop, last=True)]
    assert "".join(pieces) == tok.decode(ids).strip()
    with pytest.raises(RuntimeError):
        stream.feed(ids[0])


def test_answer_stream_stops_on_a_string(tiny_processor):
    tok = tiny_processor.tokenizer
    ids = tok.encode("one two three four")
    stream = AnswerStream(tok, tok.stop_ids, stop_strings=[" three"])
    text = ""
    for t in ids:
        text += stream.feed(t)
        if stream.stopped:
            break
    text += stream.finish()
    assert text == "one two" and stream.stopped
