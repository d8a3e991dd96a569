"""TextAssembler: whole UTF-8 characters only, and stop strings never sent, across token edges."""

from __future__ import annotations

import pytest

from worker.text import ChoiceText, TextAssembler


def run(pieces: list[bytes], stop: list[str]) -> tuple[str, bool]:
    text = TextAssembler(stop)
    out = "".join(text.feed(p) for p in pieces)
    return out + text.flush(), text.stopped


def test_multibyte_character_split_across_tokens_is_held_until_whole() -> None:
    text = TextAssembler([])
    euro = "€".encode()

    assert text.feed(b"price " + euro[:1]) == "price "
    assert text.feed(euro[1:2]) == ""
    assert text.feed(euro[2:] + b"5") == "€5"


@pytest.mark.parametrize(
    ("pieces", "stop", "expected"),
    [
        ([b"Hello ", b"EN", b"D", b" more"], ["END"], "Hello "),
        ([b"a<", b"|", b"x"], ["<|end|>"], "a<|x"),
        ([b"one. two", b". three"], [". t"], "one"),
        ([b"abc"], ["zzz", "b"], "a"),
    ],
)
def test_stop_string_spanning_tokens_is_cut_and_never_sent(
    pieces: list[bytes], stop: list[str], expected: str
) -> None:
    assert run(pieces, stop)[0] == expected


def test_text_held_for_a_partial_stop_match_is_released_when_it_does_not_match() -> None:
    text = TextAssembler(["STOP"])

    assert text.feed(b"ST") == ""
    assert text.feed(b"AR") == "STAR"
    assert not text.stopped


def test_partial_match_at_the_end_is_flushed() -> None:
    assert run([b"the ST"], ["STOP"]) == ("the ST", False)


def logprob(token: str) -> dict[str, object]:
    return {"token": token, "logprob": -1.0, "bytes": list(token.encode()), "top_logprobs": []}


def test_a_tokens_logprobs_go_out_with_the_text_that_completes_it() -> None:
    choice = ChoiceText(["world"])

    held = choice.feed(b"Hello wor", [logprob("Hello wor")])  # " wor" may start "world"
    released = choice.feed(b"m", [logprob("m")])

    assert (held.text, held.logprobs) == ("Hello ", [])
    assert released.text == "worm"
    assert [e["token"] for e in released.logprobs] == ["Hello wor", "m"]
    assert released.offset == len("Hello ")


def test_logprobs_of_tokens_a_stop_string_cuts_away_are_dropped() -> None:
    choice = ChoiceText(["o w"])
    pieces = ["Hel", "lo", " wor", "ld"]

    outs = [choice.feed(p.encode(), [logprob(p)]) for p in pieces] + [choice.flush()]

    assert "".join(o.text for o in outs) == "Hell"
    assert [e["token"] for o in outs for e in o.logprobs] == ["Hel", "lo"]  # " wor" is cut
    assert choice.stopped


def test_a_character_split_across_tokens_releases_both_tokens_logprobs_with_it() -> None:
    choice = ChoiceText([])
    euro = "€".encode()

    first = choice.feed(euro[:1], [logprob("\ufffd")])
    second = choice.feed(euro[1:], [logprob("\ufffd")])

    assert (first.text, first.logprobs) == ("", [])
    assert (second.text, len(second.logprobs)) == ("€", 2)
