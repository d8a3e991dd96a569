"""Several choices in one stream, on the synthetic backend (each choice the same text): the
stream keeps every one of their entries, and a replay reads them all back (issue 28)."""

from __future__ import annotations

import httpx

from tests.sse import stream


async def test_a_stream_of_eight_choices_keeps_every_entry_for_a_replay(
    client: httpx.AsyncClient,
) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    body |= {"n": 8, "max_tokens": 40, "logprobs": True}

    live = await stream(client, body)
    replay = await stream(client, None, f"/v1/streams/{live.headers['x-sluice-stream-id']}")

    assert not live.errors
    assert [e.data for e in replay.events] == [e.data for e in live.events]
    texts: dict[int, str] = {}
    for chunk in live.chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"]["content"]
    assert len(texts) == 8
    assert len(set(texts.values())) == 1
    assert len(texts[0].split()) == 40
