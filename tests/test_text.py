"""Stop strings over text that arrives in arbitrary pieces."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequestError
from engine.text import StopStringMatcher


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Non-streamed answer: cut at the first point where some stop completes (longest on a tie)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """Feed pieces; check the stream only ever grows the final output; return (output, stopped)."""
    expected, _ = reference("".join(pieces), stops)
    m = StopStringMatcher(stops)
    out, stopped = "", False
    for piece in pieces:
        safe, stopped = m.push(piece)
        out += safe
        assert expected.startswith(out)  # nothing shown is ever taken back
        if stopped:
            assert m.push("more") == ("", True)
            break
    else:
        out += m.flush()
    return out, stopped


def splits(text: str) -> list[list[str]]:
    """The text whole, one char at a time, and cut in two at every position."""
    return [[text], list(text), *([text[:k], text[k:]] for k in range(len(text) + 1))]


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("Hello world. Goodbye", ["."]),
        ("Hello world<|end|> trailing", ["<|end|>"]),
        ("User: hi\nAssistant: hello\nUser:", ["\nUser:"]),
        ("no stop in here at all", ["STOP"]),
        ("ends with a partial <|en", ["<|end|>"]),
        ("STOP at the very start", ["STOP"]),
        ("abcd", ["abcd", "bc"]),  # overlapping: "bc" completes first
        ("xabcx", ["bc", "abc"]),  # both complete at once: the longer one is cut
        ("aaab", ["aab"]),  # a stop overlapping itself
        ("ababac", ["abac"]),
        ("中文😀 stop 😀", ["😀 s", "op"]),
    ],
)
def test_stop_across_every_split(text, stops):
    expected = reference(text, stops)
    for pieces in splits(text):
        assert run(stops, pieces) == expected


def test_examples():
    assert reference("Hello world<|end|> trailing", ["<|end|>"]) == ("Hello world", True)
    assert reference("STOP at the very start", ["STOP"]) == ("", True)
    assert reference("abcd", ["abcd", "bc"]) == ("a", True)
    assert reference("xabcx", ["bc", "abc"]) == ("x", True)


def test_partial_stop_is_held_then_released():
    m = StopStringMatcher(["<|end|>"])
    assert m.push("Hello <|e") == ("Hello ", False)
    assert m.push("nd") == ("", False)
    assert m.push("x more") == ("<|endx more", False)
    assert m.push("<|") == ("", False)
    assert m.flush() == "<|"
    m = StopStringMatcher(["<|end|>"])
    assert m.push("a<|en") == ("a", False)
    assert m.push("d|>b") == ("", True)
    assert m.stopped and m.flush() == ""


def test_stop_at_very_start_and_empty_pieces():
    m = StopStringMatcher(["Once"])
    assert m.push("") == ("", False)
    assert m.push("Once upon") == ("", True)
    m = StopStringMatcher(["x"])
    assert m.push("") == ("", False)
    assert m.flush() == ""


def test_validation():
    assert StopStringMatcher("abc").stop == ("abc",)  # one string is one stop string
    assert StopStringMatcher([]).push("anything") == ("anything", False)
    for bad in ([""], ["ok", ""], [3], ["ok", None], 5, None):
        with pytest.raises(InvalidRequestError):
            StopStringMatcher(bad)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab c<|>\n中😀", max_size=30),
    stops=st.lists(st.text(alphabet="ab c<|>\n中😀", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_random_pieces_match_reference(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert run(stops, pieces) == reference(text, stops)
