"""The `openai` backend: the model runs on an engine behind an OpenAI-compatible API (vLLM,
SGLang, TGI, Ollama, llama.cpp's `llama-server`, a hosted API), and each job streams from it.

One pooled aiohttp session carries every job of the worker (httpx spent over twice its CPU per
request, side by side: bench/engine_clients.py). A job's request is sent on the first read of its
pieces, so a job that never reads them never occupies the engine, and it is closed when they are
closed: finished, cancelled, unread, or timed out (the engine then frees its slot).

What is sent: what the client asked for, and nothing it did not. Sampling parameters the client
left out (`temperature`, `top_p`, the penalties) are left out, so the engine's own defaults apply.
`n`, `logprobs`, `top_logprobs`, `logit_bias`, content parts that are not text (images, audio),
tools, `tool_choice`, `parallel_tool_calls`, `response_format`, the messages that carry calls and
their answers, and every field sluice does not know (vLLM's `top_k`, `chat_template_kwargs`, …)
go as the client sent them; sluice keeps `stream`, `stream_options`, `model` and `max_tokens` its
own. The engine's choices and logprobs come back as `Piece`s, and are stored like the llama
worker's; its tool-call deltas in OpenAI's canonical shape whatever its habits
(worker/tool_calls.py), and a choice that called a tool finishes `tool_calls` even where the
engine says `stop`.
`min_tokens` that sluice adds itself (the seed format's) is dropped, for the life of the backend,
by an engine that refuses it (a strict hosted API): the request is sent again without it.

Failures:
- the engine refuses the request (a 4xx): the job fails with the engine's own status and error;
- it does not answer, or answers 5xx, 408 or 429, before the first token: the request is sent
  again, with backoff (honouring `Retry-After`), for up to `SLUICE_QUEUE_TIMEOUT_S`, then the job
  fails with `upstream_unavailable`;
- it accepts the request, then says nothing for `SLUICE_UPSTREAM_TIMEOUT_S` (before its first
  byte, or between two chunks): the job fails with `upstream_timeout`, not sent again (the
  worker gives a job with no token yet to another worker first, if one serves the model);
- its stream is cut after the first token: the job fails with `upstream_error`.
Network errors name hosts and ports: they go to the log, never to clients.

`available` is False from a failure to reach the engine (a 5xx, a silence past the timeout) until
it answers again. While it is False, reading it starts a probe (`GET /models`, at most one a
second): the worker, which reads it before claiming jobs and in every heartbeat, sees the engine
come back with no loop here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator, Callable
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from shared.errors import (
    ErrorBody,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from shared.protocol import Finished, FinishReason, finish_reason
from shared.schema import GenerationJob
from shared.settings import Settings
from worker.backends import BackendError, Generation, Piece
from worker.tool_calls import EngineCalls

log = logging.getLogger("sluice.worker")

DEFAULT_MAX_JOBS = 64
"""Jobs one worker streams at once unless SLUICE_WORKER_MAX_JOBS says otherwise: the engine
batches them, and the worker only relays text."""
CONNECT_TIMEOUT_S = 5.0
LINE_BUFFER_BYTES = 1 << 20
"""The engine's stream is read a line at a time; aiohttp refuses a line over twice its buffer."""
PROBE_EVERY_S = 1.0
MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
RETRIED = frozenset({408, 429})
"""4xx statuses that say "not now" rather than "not this request"."""
CREDENTIALS = frozenset({401, 403, 407})
"""4xx statuses about sluice's own credentials for the engine, which no client can fix."""
UNAVAILABLE = "the model's engine is not available; try again later"


class OpenAIBackend:
    def __init__(self, settings: Settings) -> None:
        assert settings.upstream_url is not None
        self.max_concurrency = settings.worker_max_jobs or DEFAULT_MAX_JOBS
        self._url = settings.upstream_url.rstrip("/")
        key = settings.upstream_api_key
        self._headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        self._wait_s = settings.queue_timeout_s
        self._silence_s = settings.upstream_timeout_s
        self._refuses_min_tokens = False
        """Learned from the engine's first refusal of a `min_tokens` sluice added."""
        # Names are needed before the worker can serve: without SLUICE_UPSTREAM_MODEL, wait for
        # the engine to list its models; with it, one look (for its context length) will do.
        listed = self._list_models(until_answered=settings.upstream_model is None)
        if settings.upstream_model is not None:
            self.upstream_model = settings.upstream_model
        elif listed:
            self.upstream_model = str(listed[0]["id"])
        else:
            raise BackendError(f"{self._url}/models lists no model: set SLUICE_UPSTREAM_MODEL")
        self.model = settings.served_model_name or self.upstream_model
        self.n_ctx = self._context_length(listed) if listed is not None else None
        self._available = listed is not None
        self._http: aiohttp.ClientSession | None = None
        self._proxy = _env_proxy(self._url)
        self._closing: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._next_probe = 0.0
        log.info(
            "upstream %s: serving its %r as %r (context: %s)",
            self._url,
            self.upstream_model,
            self.model,
            self.n_ctx or "unknown",
        )

    # --- names, at start-up (no event loop yet) ---

    def _list_models(self, *, until_answered: bool) -> list[dict[str, Any]] | None:
        backoff = MIN_BACKOFF_S
        while True:
            try:
                listed = self._get_json(f"{self._url}/models")["data"]
                return [m for m in listed if isinstance(m, dict) and "id" in m]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if not until_answered:
                    log.warning("upstream %s does not list its models: %s", self._url, exc)
                    return None
                log.warning(
                    "upstream %s does not list its models (%s); asking again in %.1f s",
                    self._url,
                    exc,
                    backoff,
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _context_length(self, listed: list[dict[str, Any]]) -> int | None:
        """vLLM lists `max_model_len`; llama-server tells a slot's context in its `/props`."""
        for entry in listed:
            if entry["id"] == self.upstream_model and isinstance(entry.get("max_model_len"), int):
                return int(entry["max_model_len"])
        if not self._url.endswith("/v1"):
            return None
        try:
            props = self._get_json(f"{self._url.removesuffix('/v1')}/props")
            n_ctx = props["default_generation_settings"]["n_ctx"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None

    def _get_json(self, url: str) -> Any:
        """Raises OSError for an answer that is not a success (urllib's HTTPError)."""
        request = urllib.request.Request(url, headers=self._headers)
        with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response:
            return json.load(response)

    # --- availability ---

    @property
    def available(self) -> bool:
        if not self._available:
            self._probe_soon()
        return self._available

    @available.setter
    def available(self, value: bool) -> None:
        if value != self._available:
            log.warning("upstream %s %s", self._url, "answers" if value else "is unavailable")
        self._available = value

    def _probe_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if (self._probe is not None and not self._probe.done()) or loop.time() < self._next_probe:
            return
        self._next_probe = loop.time() + PROBE_EVERY_S
        self._probe = loop.create_task(self._probe_once(), name="upstream-probe")

    async def _probe_once(self) -> None:
        try:
            async with self._session().get(
                f"{self._url}/models",
                proxy=self._proxy,
                timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S),
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            return
        if status < 500:
            self.available = True

    # --- jobs ---

    def _session(self) -> aiohttp.ClientSession:
        # Made on first use: the backend is built before the worker's event loop runs.
        if self._http is None:
            self._http = aiohttp.ClientSession(
                headers=self._headers,
                # The read timeout bounds each wait for the engine's next bytes (its first, and
                # between chunks): above its longest prefill, so only a hung engine trips it.
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self._silence_s
                ),
                connector=aiohttp.TCPConnector(limit=self.max_concurrency + 1),  # and the probe
                read_bufsize=LINE_BUFFER_BYTES,
            )
        return self._http

    async def start(self, job: GenerationJob) -> Generation:
        def report(finished: Finished) -> None:
            generation.finished = finished

        generation = Generation(0, self._pieces(job, report), ends_itself=True)
        return generation

    def _request(self, job: GenerationJob) -> tuple[str, dict[str, Any]]:
        chat = job.messages is not None
        # What sluice does not interpret goes as it came; what it does is sluice's to say.
        body: dict[str, Any] = job.extra | {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": job.max_tokens,
        }
        # Only what the client gave: the engine's own defaults suit its model.
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            if (value := getattr(job, name)) is not None:
                body[name] = value
        if job.stop:
            body["stop"] = job.stop
        if job.seed is not None:
            body["seed"] = job.seed
        for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
            if (value := getattr(job, name)) is not None:
                body[name] = value
        if job.n != 1:
            body["n"] = job.n
        if job.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in job.logit_bias.items()}
        if job.logprobs and chat:
            body["logprobs"] = True
            if job.top_logprobs:
                body["top_logprobs"] = job.top_logprobs
        elif job.logprobs:
            body["logprobs"] = job.top_logprobs  # the legacy form: a number
        # vLLM's extension (llama-server ignores it, a strict hosted API refuses it).
        if job.min_tokens and not (job.min_tokens_default and self._refuses_min_tokens):
            body["min_tokens"] = job.min_tokens
        if chat:
            return "/chat/completions", body | {"messages": job.messages}
        return "/completions", body | {"prompt": job.prompt}

    async def _pieces(
        self, job: GenerationJob, report: Callable[[Finished], None]
    ) -> AsyncGenerator[bytes | Piece, None]:
        path, body = self._request(job)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        backoff = MIN_BACKOFF_S
        while True:
            reader = _StreamReader(job.max_tokens, job.n)
            retry_after: float | None = None
            try:
                async with self._session().post(
                    self._url + path, json=body, proxy=self._proxy, allow_redirects=False
                ) as response:
                    if not 200 <= response.status < 300:
                        retry_after = await self._refused(response, job, body)
                    else:
                        self.available = True
                        async for line in response.content:
                            for piece in reader.feed(line.decode()):
                                yield piece
                            if reader.overran:
                                break
                        report(reader.finished or reader.ended())
                        return
            except _WithoutMinTokens:
                body = {k: v for k, v in body.items() if k != "min_tokens"}
                continue
            except aiohttp.SocketTimeoutError:
                # Hung, not down: sending again would wait as long, and load it more.
                self.available = False  # until it answers a probe
                log.warning(
                    "upstream %s said nothing for %g s (%s)",
                    self._url,
                    self._silence_s,
                    f"after {reader.pieces} pieces" if reader.pieces else "before its first token",
                )
                raise UpstreamTimeout(
                    f"the model's engine said nothing for {self._silence_s:g} s"
                ) from None
            except (aiohttp.ClientError, _Cut) as exc:
                self.available = False  # most likely down; if not, the probe says so at once
                if reader.pieces:
                    log.warning("upstream %s cut the stream: %r", self._url, exc)
                    raise UpstreamError("the model's engine stopped while answering") from None
                problem = repr(exc)
            else:
                problem = f"HTTP {response.status}"
            now = loop.time()
            if now >= deadline:
                log.warning("upstream %s: %s; giving up", self._url, problem)
                raise UpstreamUnavailable(UNAVAILABLE)
            delay = min(retry_after if retry_after is not None else backoff, deadline - now)
            log.warning("upstream %s: %s; trying again in %.2f s", self._url, problem, delay)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _refused(
        self, response: aiohttp.ClientResponse, job: GenerationJob, body: dict[str, Any]
    ) -> float | None:
        """Raises for a refusal that trying again will not change; else how long to wait before
        trying again, if the engine said (`Retry-After`)."""
        status = response.status
        content = await response.read()
        if status >= 500:
            self.available = False
        elif status in CREDENTIALS:
            log.error("upstream %s refused sluice's credentials: %s", self._url, content[:500])
            raise UpstreamUnavailable(UNAVAILABLE)
        elif status not in RETRIED:
            error = _engine_error(status, content)
            if job.min_tokens_default and "min_tokens" in body and _names_min_tokens(error):
                if not self._refuses_min_tokens:
                    log.warning(
                        "upstream %s refuses min_tokens (%s): seed-format requests go without it",
                        self._url,
                        error["message"][:200],
                    )
                self._refuses_min_tokens = True
                raise _WithoutMinTokens()
            raise UpstreamRejected(status, error)
        return _retry_after(response.headers.get("retry-after"))

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._http is not None:
            # Best effort: close() is synchronous, and the process is ending anyway.
            with contextlib.suppress(RuntimeError):  # no event loop runs any more
                self._closing = asyncio.get_running_loop().create_task(self._http.close())


def _env_proxy(url: str) -> str | None:
    """The proxy that `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` name for the engine, as httpx
    and the openai SDK honour them. Looked up once: aiohttp's `trust_env` looks it up, and
    `~/.netrc`, in a thread on every request (2 ms before each request left, measured in front of
    a scripted engine at 4 streams)."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class _WithoutMinTokens(Exception):
    """The engine refused the `min_tokens` sluice added: send the request again without it."""


def _names_min_tokens(error: ErrorBody) -> bool:
    return error["param"] == "min_tokens" or "min_tokens" in error["message"]


class _Cut(Exception):
    """The engine's stream ended without saying it was complete, or said something unreadable."""


class _StreamReader:
    """One job's SSE lines from the engine → its pieces (each choice's text, logprobs and, with
    several choices, finish reason), then how it finished."""

    def __init__(self, max_tokens: int, choices: int = 1) -> None:
        self._max_tokens = max_tokens
        self._choices = choices
        self.pieces = 0
        self._reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self.finished: Finished | None = None
        self.overran = False
        self._calls: dict[int, EngineCalls] = {}
        """Per choice: its tool calls, normalized."""

    def feed(self, line: str) -> list[bytes | Piece]:
        if self.finished is not None:
            return []  # past [DONE]: the body's end, read so that its connection is reused
        if line.startswith("data:"):
            data = line[5:].strip()
        elif line.startswith("error:"):  # how some llama-server versions send a late error
            data = line[6:].strip()
        else:
            return []  # blank separators, comments, `event:` and `id:` lines
        if data == "[DONE]":
            self._finish(self._reason or "stop")
            return []
        try:
            chunk = json.loads(data)
            if "error" in chunk:
                self._fail(chunk)
            if isinstance(usage := chunk.get("usage"), dict):
                self._usage = usage
            pieces = [self._piece(choice) for choice in chunk.get("choices") or ()]
        except (ValueError, AttributeError, TypeError, IndexError, KeyError) as exc:
            raise _Cut(f"unreadable chunk: {data[:200]!r}") from exc
        out: list[bytes | Piece] = []
        for piece in pieces:
            if piece.text and self.pieces >= self._max_tokens * self._choices:
                self._finish("length")  # an engine that does not honour max_tokens: stop it here
                self.overran = True
                break
            self.pieces += bool(piece.text)
            if piece == Piece(piece.text):  # choice 0's text and nothing else: bytes, as ever
                if piece.text:
                    out.append(piece.text)
            else:
                out.append(piece)
        return out

    def _piece(self, choice: dict[str, Any]) -> Piece:
        index = int(choice.get("index") or 0)
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        reason = choice.get("finish_reason")
        calls = delta.get("tool_calls") if isinstance(delta, dict) else None
        engine_calls = self._calls.setdefault(index, EngineCalls())
        tool_calls = engine_calls.feed(calls) if isinstance(calls, list) else []
        if index == 0:
            self._reason = reason or self._reason
        return Piece(
            text.encode() if text else b"",
            index,
            _logprob_entries(choice.get("logprobs")),
            tool_calls or None,
            self._reason_of(index, reason) if reason and self._choices > 1 else None,
        )

    def _reason_of(self, index: int, reason: str) -> FinishReason:
        """A choice's finish reason: `tool_calls` if it called a tool and was not cut short
        (vLLM and others say `stop` after tool calls, and a client's agent loop looks for this
        one), else the engine's own, as sluice names it."""
        calls = self._calls.get(index)
        if calls is not None and calls.count and reason != "length":
            return "tool_calls"
        return finish_reason(reason if reason != "tool_calls" else None)

    def ended(self) -> Finished:
        """How it finished, if the engine's answer ended without `[DONE]`: complete only if
        the engine had said why it stopped."""
        if self._reason is None:
            raise _Cut("the stream ended without a finish reason or [DONE]")
        self._finish(self._reason)
        assert self.finished is not None
        return self.finished

    def _fail(self, chunk: dict[str, Any]) -> None:
        body = _engine_error(500, json.dumps(chunk).encode())
        status = body["code"] if isinstance(body["code"], int) else 500
        if self.pieces == 0 and 400 <= status < 500:
            raise UpstreamRejected(status, body)
        log.warning("the engine's stream failed: %s", body["message"])
        raise UpstreamError("the model's engine failed while answering")

    def _finish(self, reason: str) -> None:
        usage = self._usage or {}
        self.finished = Finished(
            self._reason_of(0, reason),
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or self.pieces),
            self._choices,
        )


def _logprob_entries(logprobs: Any) -> list[dict[str, Any]] | None:
    """An engine's logprobs of a chunk as chat's `logprobs.content` entries, whichever shape it
    sent: chat's own, or the legacy completions' parallel lists."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(content := logprobs.get("content"), list):
        return content or None
    tokens = logprobs.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        return None
    top = logprobs.get("top_logprobs") or [None] * len(tokens)
    entries = []
    for token, logprob, alternatives in zip(tokens, logprobs["token_logprobs"], top, strict=True):
        ranked = sorted((alternatives or {}).items(), key=lambda alt: -alt[1])
        entries.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked
                ],
            }
        )
    return entries


def _engine_error(status: int, content: bytes) -> ErrorBody:
    """The engine's error as OpenAI shapes it (`{"error": {...}}`), whatever the engine sent:
    vLLM's older bare object, a bare string, or no JSON at all."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    error = data.get("error", data) if isinstance(data, dict) else None
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return {
            "message": f"the model's engine refused the request (HTTP {status})",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    return {
        "message": error["message"],
        "type": str(error.get("type") or "invalid_request_error"),
        "param": error.get("param"),
        "code": error.get("code"),
    }


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds, given as seconds or as an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
