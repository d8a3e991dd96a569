"""logprobs, logit_bias and `n` on the real model (issue 28): the values are the model's, they
travel in the stream's entries (a resume reads the same ones back), and bad values get a 400
naming the parameter.

The stack runs without a repeat penalty, so that greedy decoding picks the model's own most
likely token: the one its logprobs rank first.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import llama_cpp
import openai
import pytest

from shared.settings import Settings, bundled_model_path
from tests.procs import RedisServer, Stack, start_stack
from tests.sse import SSEResult, stream

pytestmark = pytest.mark.model

USER = [{"role": "user", "content": "Write a short story about a cat."}]
MODEL = Settings(backend="llama").model_name


@pytest.fixture(scope="module")
def sampling(redis_server: RedisServer) -> Iterator[Stack]:
    """API + one llama worker (8 sequences), no repeat penalty; database 13."""
    stack = start_stack("sampling", redis_server.url(13), 1, backend="llama", repeat_penalty="1")
    yield stack
    stack.stop()


@pytest.fixture
async def api(sampling: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sampling.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def vocab() -> Iterator[llama_cpp.Llama]:
    """The model's tokenizer alone, for token ids."""
    model = llama_cpp.Llama(str(bundled_model_path()), vocab_only=True, verbose=False)
    yield model
    model.close()


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, "temperature": 0, **fields}


def streamed_logprobs(result: SSEResult, index: int = 0) -> list[dict[str, Any]]:
    return [
        entry
        for chunk in result.chunks
        for choice in chunk.get("choices", [])
        if choice["index"] == index and choice.get("logprobs")
        for entry in choice["logprobs"]["content"]
    ]


def texts_by_choice(result: SSEResult) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in result.chunks:
        for choice in chunk.get("choices", []):
            content = choice["delta"].get("content") or ""
            texts[choice["index"]] = texts.get(choice["index"], "") + content
    return texts


def finish_reasons(result: SSEResult) -> dict[int, str]:
    return {
        choice["index"]: choice["finish_reason"]
        for chunk in result.chunks
        for choice in chunk.get("choices", [])
        if choice.get("finish_reason")
    }


def single_token(vocab: llama_cpp.Llama, text: bytes) -> int:
    tokens = vocab.tokenize(text, add_bos=False, special=False)
    assert len(tokens) == 1, f"{text!r} is {len(tokens)} tokens for this model"
    return tokens[0]


async def test_greedy_logprobs_rank_the_chosen_token_first_and_are_log_probabilities(
    api: httpx.AsyncClient,
) -> None:
    result = await stream(api, chat(stream=True, max_tokens=8, logprobs=True, top_logprobs=5))

    entries = streamed_logprobs(result)
    assert len(entries) == 8
    for entry in entries:
        top = entry["top_logprobs"]
        assert entry["logprob"] <= 0
        assert len(top) == 5
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
        assert top[0]["bytes"] == entry["bytes"]
    # each token's logprobs came with its text, all of it
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == result.text


async def test_a_resume_and_a_replay_give_the_same_logprobs(api: httpx.AsyncClient) -> None:
    body = chat(stream=True, max_tokens=12, logprobs=True, top_logprobs=3, temperature=0.8)
    first = await stream(api, body, cut_after=5)
    stream_id = first.headers["x-sluice-stream-id"]
    last_seen = first.events[-1].id
    assert last_seen is not None

    rest = await stream(api, None, f"/v1/streams/{stream_id}", headers={"Last-Event-ID": last_seen})
    whole = await stream(api, None, f"/v1/streams/{stream_id}")

    assert len(streamed_logprobs(whole)) == 12
    assert streamed_logprobs(first) + streamed_logprobs(rest) == streamed_logprobs(whole)
    assert [e.data for e in first.events + rest.events] == [e.data for e in whole.events]


async def test_logit_bias_100_makes_a_token_the_answer(
    api: httpx.AsyncClient, vocab: llama_cpp.Llama
) -> None:
    purple = single_token(vocab, b" purple")

    response = await api.post(
        "/v1/chat/completions", json=chat(max_tokens=3, logit_bias={str(purple): 100})
    )

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == " purple" * 3


async def test_logit_bias_minus_100_removes_a_token(
    api: httpx.AsyncClient, vocab: llama_cpp.Llama
) -> None:
    plain = await api.post(
        "/v1/chat/completions", json=chat(max_tokens=2, logprobs=True, top_logprobs=2)
    )
    first = plain.json()["choices"][0]["logprobs"]["content"][0]
    banned = single_token(vocab, bytes(first["bytes"]))

    biased = await api.post(
        "/v1/chat/completions",
        json=chat(max_tokens=2, logprobs=True, logit_bias={str(banned): -100}),
    )

    # the model's runner-up takes its place
    chosen = biased.json()["choices"][0]["logprobs"]["content"][0]
    assert chosen["token"] != first["token"]
    assert chosen["token"] == first["top_logprobs"][1]["token"]


async def test_n_at_temperature_0_gives_identical_choices_with_usage_summed(
    api: httpx.AsyncClient,
) -> None:
    response = await api.post("/v1/chat/completions", json=chat(max_tokens=6, n=4))

    body = response.json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert len({c["message"]["content"] for c in choices}) == 1
    assert choices[0]["message"]["content"]
    assert [c["finish_reason"] for c in choices] == ["length"] * 4
    assert body["usage"]["completion_tokens"] == 4 * 6


async def test_n_with_a_seed_at_temperature_1_streams_choices_that_come_again(
    api: httpx.AsyncClient,
) -> None:
    body = chat(stream=True, max_tokens=10, n=4, temperature=1, seed=11)

    first = await stream(api, body)
    again = await stream(api, body)

    texts = texts_by_choice(first)
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts == texts_by_choice(again)
    assert len(set(texts.values())) > 1  # each choice draws for itself
    roles = [c for c in first.chunks[0]["choices"] if c["delta"].get("role") == "assistant"]
    assert [c["index"] for c in roles] == [0, 1, 2, 3]
    assert finish_reasons(first) == {i: "length" for i in range(4)}
    assert first.events[-1].data == "[DONE]"


async def test_stop_strings_end_each_choice_on_its_own(api: httpx.AsyncClient) -> None:
    body = chat(stream=True, max_tokens=48, n=4, temperature=1, seed=5, stop=["."])

    result = await stream(api, body)

    texts = texts_by_choice(result)
    assert len(set(texts.values())) == 4
    assert all(text and "." not in text for text in texts.values())
    assert finish_reasons(result) == {i: "stop" for i in range(4)}


async def test_legacy_completions_give_logprobs_in_their_own_shape(
    api: httpx.AsyncClient,
) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}

    response = await api.post("/v1/completions", json=body | {"logprobs": 3})

    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens = logprobs["tokens"]
    assert len(tokens) == 5
    assert "".join(tokens) == choice["text"]
    assert logprobs["text_offset"] == [len("".join(tokens[:k])) for k in range(5)]
    ranked = zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
    for token, logprob, top in ranked:
        assert logprob <= 0
        assert top[token] == logprob  # the sampled token is always among them
        assert max(top.values()) == logprob  # greedy: it is the most likely
        assert len(top) == 3


async def test_the_openai_sdk_reads_choices_and_logprobs(sampling: Stack) -> None:
    asked: dict[str, Any] = {"model": MODEL, "messages": USER, "n": 2, "max_tokens": 4}
    asked |= {"logprobs": True, "top_logprobs": 2, "temperature": 0}
    async with openai.AsyncOpenAI(base_url=f"{sampling.base_url}/v1", api_key="-") as sdk:
        completion = await sdk.chat.completions.create(**asked)
        async with sdk.chat.completions.stream(**asked) as events:
            # The helper refuses to parse an answer cut at max_tokens, and hands it over so.
            with pytest.raises(openai.LengthFinishReasonError) as cut:
                await events.get_final_completion()
    streamed = cut.value.completion

    for answer in (completion, streamed):
        assert [c.index for c in answer.choices] == [0, 1]
        for choice in answer.choices:
            assert choice.logprobs is not None
            assert choice.logprobs.content is not None
            assert len(choice.logprobs.content) == 4
            first = choice.logprobs.content[0]
            assert first.top_logprobs[0].token == first.token
            assert "".join(e.token for e in choice.logprobs.content) == choice.message.content


async def test_responses_stream_their_logprobs_when_included(api: httpx.AsyncClient) -> None:
    body = {
        "input": "Name a colour.",
        "max_output_tokens": 4,
        "temperature": 0,
        "stream": True,
        "top_logprobs": 2,
        "include": ["message.output_text.logprobs"],
    }

    result = await stream(api, body, "/v1/responses")

    deltas = [c for c in result.chunks if c.get("type") == "response.output_text.delta"]
    logprobs = [entry for d in deltas for entry in d["logprobs"]]
    assert len(logprobs) == 4
    assert "".join(e["token"] for e in logprobs) == "".join(d["delta"] for d in deltas)
    assert all(len(e["top_logprobs"]) == 2 for e in logprobs)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(logit_bias={"49152": 5}), "logit_bias"),
        (chat(logit_bias={"1": 5, "999999": -5}), "logit_bias"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
        ),
    ],
    ids=["a token id past the vocabulary", "one of several", "an image"],
)
async def test_what_only_the_model_can_check_gets_a_400_naming_it(
    api: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    response = await api.post("/v1/chat/completions", json=body)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
