"""The relay's encoding of stream entries: tokens that piled up become one event."""

from __future__ import annotations

import json

from api.relay import EventEncoder
from shared.protocol import Finished, Started, Token
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
