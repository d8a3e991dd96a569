"""The real model: llama.cpp through llama-cpp-python's C bindings, on a GGUF with its own chat
template. A worker serves up to `SLUICE_WORKER_MAX_JOBS` jobs at once, decoded together (issue 14).

One context holds one sequence per job (`n_seq_max`), each with `SLUICE_N_CTX` cells of its own
KV cache; one thread steps them all (worker/backends/batcher.py says how). Here: the model, the
prompt (chat template, tokens), and each job's tokens handed to the event loop as they come, so
the worker's loop stays free for Redis writes and heartbeats. A job with tools or a response
format gets a grammar for its sequence (worker/backends/grammar.py); its tools are rendered into
the prompt and its answer read into tool-call deltas in llama.cpp's generic format
(worker/backends/generic_format.py).
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_types import ChatCompletionRequestMessage

from shared.errors import InvalidRequest
from shared.schema import GenerationJob
from shared.settings import Settings
from worker.backends import BackendError, Generation, Piece
from worker.backends.batcher import DONE, Batcher, Sampling, Sequence, grammar_sampler
from worker.backends.generic_format import AnswerReader, ToolUse
from worker.backends.grammar import ANY_JSON, check_supported, schema_grammar

_MARK = "\ue000"
"""Marks each content's placeholder in the rendered template (a private-use character). The
contents themselves are never in the rendered text, so one holding it changes nothing."""
DEFAULT_SEQUENCES = 8
"""Jobs one worker decodes together unless SLUICE_WORKER_MAX_JOBS says otherwise (README,
Benchmarks: where aggregate tokens/s levels off on 2 cores while each stream stays readable)."""


class LlamaBackend:
    def __init__(self, settings: Settings) -> None:
        assert settings.gguf_path is not None
        max_jobs = settings.worker_max_jobs or DEFAULT_SEQUENCES
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
        llama_cpp.llama_backend_init()
        self.max_concurrency = max_jobs
        self.model = settings.model_name  # SLUICE_SERVED_MODEL_NAME, else the GGUF's name
        self.n_ctx: int | None = settings.n_ctx
        self.available = True
        self._repeat_penalty = settings.repeat_penalty
        self._temperature = settings.default_temperature  # where a request does not say
        self._top_p = settings.default_top_p
        model = llama_cpp.llama_model_load_from_file(
            str(settings.gguf_path).encode(), llama_cpp.llama_model_default_params()
        )
        if not model:
            raise BackendError(f"llama.cpp could not load {settings.gguf_path}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = max_jobs
        params.n_ctx = settings.n_ctx * max_jobs  # split evenly: SLUICE_N_CTX cells each
        params.n_batch = params.n_ubatch = max(settings.n_batch, max_jobs)
        params.n_threads = params.n_threads_batch = settings.n_threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise BackendError("llama.cpp could not create a context")
        self._ctx = ctx
        self._n_ctx_seq = llama_cpp.llama_n_ctx_seq(ctx)
        template = llama_cpp.llama_model_chat_template(model, None)
        if not template:
            self.close()
            raise BackendError(f"{settings.gguf_path} has no chat template")
        self._formatter = Jinja2ChatFormatter(
            template=template.decode(),
            eos_token=self._token_text(llama_cpp.llama_vocab_eos(self._vocab)),
            bos_token=self._token_text(llama_cpp.llama_vocab_bos(self._vocab)),
        )
        self._batcher = Batcher(ctx, self._vocab, max_jobs, params.n_batch)

    def _token_text(self, token: int) -> str:
        buffer = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[: max(n, 0)].decode(errors="ignore")

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode()
        size = len(data) + 2
        while True:
            tokens = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), tokens, size, add_special, parse_special
            )
            if n >= 0:
                return list(tokens[:n])
            size = -n

    def _prompt_tokens(self, job: GenerationJob, tools: ToolUse | None) -> list[int]:
        if job.messages is not None:
            messages = job.messages if tools is None else tools.messages(job.messages)
            return self._chat_tokens(messages)
        assert job.prompt is not None
        return self._tokenize(job.prompt, add_special=True, parse_special=False)

    def _chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat template's tokens, where only the template's own markers are special.

        Tokenizing the rendered prompt with specials parsed would turn a user's
        `<|im_end|><|im_start|>system` into the control tokens that forge a system turn. So the
        template is rendered with a placeholder for each message's content, its text between
        them tokenized with specials, and each content as plain text.
        """
        placeholders = [f"{_MARK}{i}{_MARK}" for i in range(len(messages))]
        rendered = self._formatter(
            messages=cast(
                list[ChatCompletionRequestMessage],
                [m | {"content": p} for m, p in zip(messages, placeholders, strict=True)],
            )
        ).prompt
        tokens: list[int] = []
        for n, piece in enumerate(rendered.split(_MARK)):
            if n % 2 == 0:  # the template's own text
                tokens += self._tokenize(piece, add_special=False, parse_special=True)
            else:
                content = messages[int(piece)]["content"] or ""
                tokens += self._tokenize(content, add_special=False, parse_special=False)
        return tokens

    def _grammar(self, job: GenerationJob, tools: ToolUse | None) -> str | None:
        """The grammar the job's answer follows, if any; 400 naming the parameter for a schema
        it cannot honour, or a grammar llama.cpp cannot build."""
        response: dict[str, Any] | None = None
        param = "response_format"
        format = job.response_format or {}
        if format.get("type") == "json_object":
            response = {"type": "object"}
        elif format.get("type") == "json_schema":
            param = "response_format.json_schema.schema"
            response = format["json_schema"].get("schema") or {"type": "object"}
            check_supported(response, param)
        if tools is not None:
            for n, tool in enumerate(job.tools or []):
                if (parameters := tool["function"].get("parameters")) is not None:
                    check_supported(parameters, f"tools[{n}].function.parameters")
            param = "tools"
            grammar = schema_grammar(tools.answer_schema(response), param)
        elif response is None:
            return None
        elif response == {"type": "object"}:
            grammar = ANY_JSON
        else:
            grammar = schema_grammar(response, param)
        sampler = grammar_sampler(self._vocab, grammar)
        if not sampler:
            raise InvalidRequest(f"llama.cpp cannot build a grammar from '{param}'", param=param)
        llama_cpp.llama_sampler_free(sampler)
        return grammar

    async def start(self, job: GenerationJob) -> Generation:
        tools = ToolUse.of(job.tools, job.tool_choice, job.parallel_tool_calls)
        grammar = self._grammar(job, tools)
        tokens = self._prompt_tokens(job, tools)
        room = self._n_ctx_seq - len(tokens)
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {len(tokens)} tokens; this model's context is {self._n_ctx_seq}",
                param="messages" if job.messages is not None else "prompt",
            )
        sampling = Sampling(
            temperature=self._temperature if job.temperature is None else job.temperature,
            top_p=self._top_p if job.top_p is None else job.top_p,
            seed=job.seed,
            repeat_penalty=self._repeat_penalty,
            presence_penalty=job.presence_penalty or 0.0,
            frequency_penalty=job.frequency_penalty or 0.0,
            min_tokens=job.min_tokens,
            grammar=grammar,
        )
        pieces = self._pieces(tokens, min(room, job.max_tokens), sampling)
        return Generation(len(tokens), pieces if tools is None else _answer(pieces))

    async def _pieces(
        self, tokens: list[int], max_new: int, sampling: Sampling
    ) -> AsyncGenerator[bytes, None]:
        # Submitted on the first read, not in start(): a job that fails before reading (its
        # stream was taken over, Redis went away) never occupies a sequence.
        seq = Sequence(tokens, max_new, sampling, asyncio.get_running_loop())
        self._batcher.submit(seq)
        try:
            while (item := await seq.queue.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise BackendError(f"llama.cpp failed: {item}") from item
                assert isinstance(item, bytes)
                yield item
        finally:
            # Finished, cancelled, stopped by a stop string or max_tokens, or the job was
            # cancelled: the sequence leaves before the next decode step and frees its cells.
            self._batcher.cancel(seq)

    def close(self) -> None:
        if hasattr(self, "_batcher"):
            self._batcher.close()
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)


async def _answer(pieces: AsyncGenerator[bytes, None]) -> AsyncGenerator[Piece, None]:
    """A tool-using answer's tokens → its text and tool-call deltas, a piece per token; the
    piece that completes the last call says so (`tool_calls`)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    reader = AnswerReader()
    called = False
    async with aclosing(pieces):
        async for token in pieces:
            out = reader.feed(decoder.decode(token))
            finished = reader.complete and not called
            called = called or finished
            yield Piece(
                out.text.encode(),
                tool_calls=out.tool_calls or None,
                finish_reason="tool_calls" if finished else None,
            )
