"""The relay's encoding of stream entries: tokens that piled up become one event."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from api.relay import SEPARATOR, EventEncoder, event
from shared.protocol import Delta, Finished, Started, Token, decode, encode
from shared.schema import ChunkEncoder

CHUNKS = ChunkEncoder("chatcmpl-x", 1, "m", "chat.completion.chunk")


def test_tokens_that_arrive_together_are_sent_as_one_event_with_the_last_id() -> None:
    batch = [
        ("1-0", Started("w", 3)),
        ("1-1", Token("a")),
        ("1-2", Token("b")),
        ("1-3", Token("c")),
    ]

    events = list(EventEncoder(CHUNKS, include_usage=False).events(batch))

    assert [e.id for e in events] == ["1-0", "1-3"]
    assert json.loads(str(events[1].data))["choices"][0]["delta"]["content"] == "abc"


def test_role_is_sent_once_even_when_a_retried_job_starts_again() -> None:
    encoder = EventEncoder(CHUNKS, include_usage=True)
    first = list(encoder.events([("1-0", Started("w1", 3))]))
    again = list(encoder.events([("2-0", Started("w2", 3)), ("2-1", Finished("stop", 3, 0))]))

    assert len(first) == 1
    assert [json.loads(str(e.data)).get("usage") for e in again] == [
        None,
        {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3},
    ]


def entry(token: str, logprob: float) -> dict[str, object]:
    alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())} | {
        "top_logprobs": alternatives
    }


def test_deltas_go_out_per_choice_and_several_choices_finish_in_their_own_chunks() -> None:
    stored = [
        Started("w", 3, None, 2),
        Delta(1, "b", [entry("b", -0.5)], offset=0),
        Delta(0, "a"),
        Delta(1, "", finish_reason="length"),
        Delta(0, "", finish_reason="stop"),
        Finished("stop", 3, 4, 2),
    ]
    # through the stream's own encoding, as a relay reads them
    batch = [(f"1-{n}", decode(*(f.encode() for f in encode(e)))) for n, e in enumerate(stored)]

    events = [json.loads(str(e.data)) for e in EventEncoder(CHUNKS, True).events(batch)]

    assert [c["index"] for c in events[0]["choices"]] == [0, 1]  # a role for each
    choices = [e["choices"][0] for e in events[1:5]]
    assert [(c["index"], c["delta"]["content"], c["finish_reason"]) for c in choices] == [
        (1, "b", None),
        (0, "a", None),
        (1, "", "length"),
        (0, "", "stop"),
    ]
    assert choices[0]["logprobs"] == {"content": [entry("b", -0.5)]}
    assert choices[1]["logprobs"] is None
    assert events[5]["usage"]["completion_tokens"] == 4  # and no finish chunk of its own
    assert len(events) == 6


def test_legacy_completions_count_text_offsets_from_the_deltas_offset() -> None:
    legacy = ChunkEncoder("cmpl-x", 1, "m", "text_completion")
    delta = Delta(0, "lo there", [entry("lo", -1.0), entry(" there", -2.0)], offset=3)

    [event] = EventEncoder(legacy, False).events([("1-1", delta)])

    assert json.loads(str(event.data))["choices"][0]["logprobs"] == {
        "tokens": ["lo", " there"],
        "token_logprobs": [-1.0, -2.0],
        "top_logprobs": [{"lo": -1.0}, {" there": -2.0}],
        "text_offset": [3, 5],
    }


@settings(max_examples=500)
@given(data=st.text(), id=st.none() | st.text())
def test_an_event_is_encoded_as_sse_starlette_encodes_it(data: str, id: str | None) -> None:
    assert event(data, id).encode() == ServerSentEvent(data, id=id, sep=SEPARATOR).encode()
