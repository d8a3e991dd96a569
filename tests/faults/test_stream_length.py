"""A stream keeps every entry it can have, and a read of entries that are gone says so: a replay
is never silently shorter than the answer."""

from __future__ import annotations

import httpx

from tests.faults.conftest import StackFactory
from tests.faults.test_workers import db_client
from tests.sse import stream

LONG_PROMPT = " ".join(f"word{n}" for n in range(200))


async def test_a_long_answer_replays_whole(make_stack: StackFactory) -> None:
    """230 entries, where sluice once capped every stream at `SLUICE_STREAM_MAXLEN` (set to 100
    here, as it could be) and trimmed the head of longer ones."""
    stack = make_stack(workers=1, synthetic_tokens_per_s="200", stream_maxlen="100")
    body = {"prompt": LONG_PROMPT, "stream": True, "max_tokens": 300}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        live = await stream(client, body)
        stream_id = live.headers["x-sluice-stream-id"]
        replay = await stream(client, path=f"/v1/streams/{stream_id}")

    assert not live.errors
    assert len(live.text) > 1500
    assert (replay.text, replay.errors) == (live.text, [])


async def test_a_read_of_entries_that_are_gone_says_so(make_stack: StackFactory) -> None:
    """The stream's head is trimmed by hand (an operator's XTRIM): a replay from the start, or
    from an entry before the oldest kept, ends with `stream_truncated`; one from a kept entry
    goes on as ever."""
    stack = make_stack(workers=1, synthetic_tokens_per_s="200")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        live = await stream(client, {"prompt": "short", "stream": True})
        stream_id = live.headers["x-sluice-stream-id"]
        ids = [e.id for e in live.events if e.id]
        assert len(ids) > 20
        with db_client(stack) as r:
            r.xtrim(f"sluice:stream:{stream_id}", maxlen=10, approximate=False)
        whole = await stream(client, path=f"/v1/streams/{stream_id}")
        early = await stream(client, path=f"/v1/streams/{stream_id}?after={ids[2]}")
        kept = await stream(client, path=f"/v1/streams/{stream_id}?after={ids[-5]}")

    for replay in (whole, early):
        assert replay.errors[-1]["code"] == "stream_truncated"
        assert replay.events[-1].data == "[DONE]"
    assert not kept.errors
    assert live.text.endswith(kept.text)
    assert kept.text
