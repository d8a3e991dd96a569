"""The raw bytes on the wire, as `curl -N` sees them."""

from __future__ import annotations

import json
import re
import subprocess

from tests.procs import Stack

EVENT = re.compile(rb"(?:id: \d+-\d+\n)?data: (.+)\n\n")


def curl(stack: Stack, body: dict[str, object]) -> tuple[bytes, bytes]:
    done = subprocess.run(
        [
            "curl",
            "-sN",
            "-D",
            "-",
            "-o",
            "-",
            f"{stack.base_url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    head, _, payload = done.stdout.partition(b"\r\n\r\n")
    return head, payload


def test_curl_sees_well_formed_events_with_lf_line_endings(synthetic: Stack) -> None:
    head, payload = curl(synthetic, {"prompt": "raw bytes", "stream": True})

    assert b"content-type: text/event-stream" in head.lower()
    assert b"\r" not in payload
    events = EVENT.findall(payload)
    assert b"".join(EVENT.sub(b"", payload).split()) == b""  # nothing but whole events
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text.startswith("You asked: raw bytes")
