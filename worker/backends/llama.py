"""The real model: llama.cpp through llama-cpp-python's C bindings, on a GGUF with its own chat
template. A worker serves up to `SLUICE_WORKER_MAX_JOBS` jobs at once, decoded together (issue 14).

One context holds one sequence per job (`n_seq_max`), each with `SLUICE_N_CTX` cells of its own
KV cache; one thread steps them all (worker/backends/batcher.py says how). Here: the model, the
prompt (chat template, tokens), and each job's tokens handed to the event loop as they come, so
the worker's loop stays free for Redis writes and heartbeats.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import cast

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_types import ChatCompletionRequestMessage

from shared.errors import InvalidRequest
from shared.schema import GenerationJob
from shared.settings import Settings
from worker.backends import BackendError, Generation, Piece, text_messages
from worker.backends.batcher import DONE, Batcher, Sampling, Sequence

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

    def _prompt_tokens(self, job: GenerationJob) -> list[int]:
        if job.messages is not None:
            return self._chat_tokens(text_messages(job.messages))
        assert job.prompt is not None
        return self._tokenize(job.prompt, add_special=True, parse_special=False)

    def _chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
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
                content = messages[int(piece)]["content"]
                tokens += self._tokenize(content, add_special=False, parse_special=False)
        return tokens

    async def start(self, job: GenerationJob) -> Generation:
        self._check_sampling(job)
        tokens = self._prompt_tokens(job)
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
            logit_bias=tuple(sorted(job.logit_bias.items())),
            logprobs=job.logprobs,
            top_logprobs=job.top_logprobs,
        )
        choices = Choices(self._batcher, tokens, min(room, job.max_tokens), sampling, job.n)
        return Generation(
            len(tokens), choices.pieces(), stop_choice=choices.stop if job.n > 1 else None
        )

    def _check_sampling(self, job: GenerationJob) -> None:
        """What only the model knows: its vocabulary, and how many sequences it decodes."""
        if job.n > self._batcher.n_seq:
            raise InvalidRequest(
                f"'n' is {job.n}; this model's workers decode at most {self._batcher.n_seq} "
                "sequences at once",
                param="n",
            )
        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        if unknown := sorted(t for t in job.logit_bias if not 0 <= t < n_vocab):
            raise InvalidRequest(
                f"'logit_bias' names token {unknown[0]}; this model's vocabulary has token ids "
                f"0 to {n_vocab - 1}",
                param="logit_bias",
            )

    def close(self) -> None:
        if hasattr(self, "_batcher"):
            self._batcher.close()
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)


class Choices:
    """One job's sequences in the batcher: one per choice, submitted on the first read of the
    pieces (a job that fails before reading them, its stream taken over or Redis gone, never
    occupies a slot), and all gone from it when the pieces are closed."""

    def __init__(
        self, batcher: Batcher, tokens: list[int], max_new: int, sampling: Sampling, n: int
    ) -> None:
        self._batcher = batcher
        self._tokens = tokens
        self._max_new = max_new
        self._sampling = sampling
        self._n = n
        self._sequences: list[Sequence] = []
        self._open = set(range(n))
        """Choices still generating."""

    def _seed(self, index: int) -> int | None:
        """Each choice draws with a seed of its own, so a seeded job's choices differ, and are
        the same again with the same seed."""
        seed = self._sampling.seed
        return None if seed is None else seed + index

    async def pieces(self) -> AsyncGenerator[bytes | Piece, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._sequences = [
            Sequence(
                self._tokens,
                self._max_new,
                replace(self._sampling, seed=self._seed(i)),
                loop,
                queue,
                index=i,
                choices=self._n,
            )
            for i in range(self._n)
        ]
        self._batcher.submit(self._sequences)
        try:
            while self._open:
                item = await queue.get()
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise BackendError(f"llama.cpp failed: {item}") from item
                if isinstance(item, Piece) and item.finish_reason is not None:
                    self._open.discard(item.index)
                assert isinstance(item, bytes | Piece)
                yield item
        finally:
            # Finished, cancelled, stopped by a stop string or max_tokens, or the job was
            # cancelled: its sequences leave before the next decode step and free their cells.
            for seq in self._sequences:
                self._batcher.cancel(seq)

    def stop(self, index: int) -> None:
        """One choice is over (a stop string): its sequence leaves, the others go on."""
        self._open.discard(index)
        if self._sequences:
            self._batcher.cancel(self._sequences[index])
