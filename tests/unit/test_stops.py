"""StopStringMatcher: stop strings found across pieces of streamed text."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from server.engine.stops import StopStringMatcher


def _run(stops: Sequence[str], pieces: Sequence[str]) -> tuple[str, bool]:
    """Feed the pieces until a stop; return all emitted text (flushed if no stop) and stopped."""
    matcher = StopStringMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_in_one_piece_drops_it_and_the_rest() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hello STOP world") == ("Hello ", True)
    assert matcher.stopped


def test_text_without_stops_passes_through() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hello ") == ("Hello ", False)
    assert matcher.feed("world") == ("world", False)
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_stop_split_across_feeds() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hel") == ("Hel", False)
    assert matcher.feed("lo ST") == ("lo ", False)  # "ST" could start "STOP": held back
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P and more") == ("", True)


def test_stop_split_over_single_characters() -> None:
    assert _run(["</answer>"], list("The answer is 42</answer> trailing")) == (
        "The answer is 42",
        True,
    )


def test_held_back_prefix_is_released_when_it_stops_matching() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", False)
    assert matcher.feed("TRY") == ("ENTRY", False)


def test_flush_releases_held_back_prefix() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("the E") == ("the ", False)
    assert matcher.flush() == "E"
    assert matcher.flush() == ""


def test_hold_back_only_what_can_start_a_stop() -> None:
    # "xab" ends with "ab", a prefix of "abc"; "b" alone would be a prefix of nothing.
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("b") == ("abb", False)


def test_longest_possible_prefix_is_held() -> None:
    # Both tails "a" and "aa" of "xaa" start "aaab"; holding only "a" would leak the first "a"
    # of the stop string once "ab" arrives.
    matcher = StopStringMatcher(["aaab"])
    assert matcher.feed("xaa") == ("x", False)
    assert matcher.feed("ab") == ("", True)


def test_stop_at_the_very_start() -> None:
    matcher = StopStringMatcher(["<|end|>"])
    assert matcher.feed("<|end|>after") == ("", True)


def test_stop_at_the_very_start_over_pieces() -> None:
    assert _run(["<|end|>"], ["<|", "end", "|>", "after"]) == ("", True)


def test_multiple_stops_any_can_end() -> None:
    assert _run(["\n\n", "Observation:"], ["Thought: x", "\nObser", "vation: y"]) == (
        "Thought: x\n",
        True,
    )
    assert _run(["\n\n", "Observation:"], ["Thought: x\n", "\nmore"]) == ("Thought: x", True)


def test_earliest_starting_stop_wins() -> None:
    assert StopStringMatcher(["world", "lo w"]).feed("hello world") == ("hel", True)
    assert StopStringMatcher(["lo w", "world"]).feed("hello world") == ("hel", True)
    # One stop a prefix of another.
    assert StopStringMatcher(["abc", "ab"]).feed("xabcd") == ("x", True)


def test_feeds_after_a_stop_return_nothing() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("aSTOPb") == ("a", True)
    assert matcher.feed("more text") == ("", True)
    assert matcher.flush() == ""


@pytest.mark.parametrize("stops", [[], [""], ["", ""]])
def test_no_stops_or_empty_ones_hold_nothing(stops: list[str]) -> None:
    matcher = StopStringMatcher(stops)
    assert matcher.feed("any text") == ("any text", False)
    assert matcher.feed("") == ("", False)
    assert matcher.flush() == ""


def test_empty_stop_is_ignored_beside_real_ones() -> None:
    assert _run(["", "STOP"], ["ab", "cSTOPd"]) == ("abc", True)


def test_unicode_stops() -> None:
    assert _run(["。结束"], ["你好", "。", "结", "束了"]) == ("你好", True)
    assert _run(["🛑"], ["go go ", "🛑", " no"]) == ("go go ", True)


def _reference(stops: Sequence[str], text: str) -> tuple[str, bool]:
    """What char-by-char streaming must give: cut at the first stop to complete."""
    ends = [(i + len(s), i) for s in stops if s for i in _find_all(text, s)]
    if not ends:
        return text, False
    _, start = min(ends)
    return text[:start], True


def _find_all(text: str, sub: str) -> list[int]:
    return [i for i in range(len(text)) if text.startswith(sub, i)]


def test_random_streams_match_reference() -> None:
    rng = random.Random(7)
    alphabet = "abc "
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 5))) for _ in "xy"]
        # Fed one character at a time, generation stops as soon as any stop is complete.
        assert _run(stops, list(text)) == _reference(stops, text), (stops, text)
        # Fed in random chunks, the emitted text is never part of a stop and never loses text.
        pieces: list[str] = []
        rest = text
        while rest:
            cut = rng.randrange(1, len(rest) + 1)
            pieces.append(rest[:cut])
            rest = rest[cut:]
        emitted, stopped = _run(stops, pieces)
        assert text.startswith(emitted)
        assert stopped == _reference(stops, text)[1]
        if stopped:
            assert any(text.startswith(s, len(emitted)) for s in stops if s)
            assert not any(s in emitted for s in stops if s)
        else:
            assert emitted == text
