"""The real model: llama.cpp through llama-cpp-python, on a GGUF with its own chat template.

llama.cpp is synchronous, so each generation runs in a thread and hands token bytes to the
event loop; the worker's loop stays free for Redis writes and heartbeats.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from typing import cast

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_types import ChatCompletionRequestMessage

from shared.errors import InvalidRequest
from shared.schema import GenerationJob
from shared.settings import Settings
from worker.backends import BackendError, Generation

_DONE = object()
_MARK = "\ue000"
"""Marks each content's placeholder in the rendered template (a private-use character). The
contents themselves are never in the rendered text, so one holding it changes nothing."""


class LlamaBackend:
    max_concurrency = 1  # one llama context decodes one sequence at a time

    def __init__(self, settings: Settings) -> None:
        assert settings.gguf_path is not None
        self._llm = llama_cpp.Llama(
            model_path=str(settings.gguf_path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_threads_batch=settings.n_threads,
            verbose=False,
        )
        self._repeat_penalty = settings.repeat_penalty
        self._vocab = self._llm._model.vocab
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendError(f"{settings.gguf_path} has no chat template")
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self._llm.token_eos()),
            bos_token=self._token_text(self._llm.token_bos()),
        )
        self._eog_ids = [
            t for t in range(self._llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        ]
        self._lock = asyncio.Lock()

    def _token_text(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode(errors="ignore")

    def _prompt_tokens(self, job: GenerationJob) -> list[int]:
        if job.messages is not None:
            return self._chat_tokens(job.messages)
        assert job.prompt is not None
        return self._llm.tokenize(job.prompt.encode(), add_bos=True, special=False)

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
            special = n % 2 == 0  # the template's own text; odd pieces name a content
            text = piece if special else messages[int(piece)]["content"]
            tokens += self._llm.tokenize(text.encode(), add_bos=False, special=special)
        return tokens

    async def start(self, job: GenerationJob) -> Generation:
        tokens = self._prompt_tokens(job)
        room = self._llm.n_ctx() - len(tokens)
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {len(tokens)} tokens; this model's context is {self._llm.n_ctx()}",
                param="messages" if job.messages is not None else "prompt",
            )
        return Generation(len(tokens), self._run(tokens, job, max_new=min(room, job.max_tokens)))

    async def _run(
        self, tokens: list[int], job: GenerationJob, max_new: int
    ) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        halt = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        async with self._lock:
            thread = threading.Thread(
                target=self._decode, args=(tokens, job, max_new, halt, emit), daemon=True
            )
            thread.start()
            try:
                while (item := await queue.get()) is not _DONE:
                    if isinstance(item, BaseException):
                        raise BackendError(f"llama.cpp failed: {item}") from item
                    assert isinstance(item, bytes)
                    yield item
            finally:
                halt.set()
                await asyncio.to_thread(thread.join)

    def _decode(
        self,
        tokens: list[int],
        job: GenerationJob,
        max_new: int,
        halt: threading.Event,
        emit: Callable[[object], None],
    ) -> None:
        try:
            self._llm.set_seed(job.seed if job.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
            if job.seed is not None:
                # Reusing a cached prompt prefix evaluates the rest in a different batch shape,
                # which moves the logits a little: enough to change sampled text. A seeded
                # request evaluates its whole prompt, so the same seed gives the same text.
                self._llm.reset()  # type: ignore[no-untyped-call]  # untyped in llama-cpp-python
            for produced, token in enumerate(
                self._llm.generate(
                    tokens,
                    temp=job.temperature,
                    top_p=job.top_p,
                    repeat_penalty=self._repeat_penalty,
                    presence_penalty=job.presence_penalty,
                    frequency_penalty=job.frequency_penalty,
                    logits_processor=self._min_tokens(job.min_tokens, len(tokens)),
                ),
                start=1,
            ):
                if halt.is_set() or token in self._eog_ids:
                    break
                emit(self._llm.detokenize([token]))
                if produced >= max_new:
                    break
        except Exception as exc:  # handed to the event loop, raised there as BackendError
            emit(exc)
        emit(_DONE)

    def _min_tokens(self, min_tokens: int, prompt_len: int) -> llama_cpp.LogitsProcessorList | None:
        """No end-of-generation token before `min_tokens` tokens (vLLM's `min_tokens`)."""
        if min_tokens <= 0:
            return None
        eog = self._eog_ids

        def suppress_eog(
            input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
        ) -> npt.NDArray[np.single]:
            if len(input_ids) - prompt_len < min_tokens:
                scores[eog] = -np.inf
            return scores

        return llama_cpp.LogitsProcessorList([suppress_eog])

    def close(self) -> None:
        self._llm.close()
