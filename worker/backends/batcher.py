"""Continuous batching: every running job is one sequence of one llama.cpp context, and each step
decodes all of them with a single `llama_decode` (issue 14).

The houses we follow: llama.cpp's server (`server_slot`s; `update_slots` puts one token of every
generating slot and chunks of new prompts into one batch) and vLLM's scheduler (admit, step,
evict, every iteration). One thread owns the context and runs the steps; the event loop hands it
`Sequence`s, may cancel them, and receives their tokens' bytes, one hand-off per step.

A step, in order:
1. evict: a sequence whose reader went away (a cancel, a stop string, a job cancelled or timed
   out) leaves, and its KV cells are removed (`llama_memory_seq_rm`), before the next decode: it
   takes part in none after the one in flight;
2. admit: a new sequence takes a free slot, one sequence id of the context, with its own KV
   cells (`SLUICE_N_CTX` of them) and its own sampler chain;
3. batch: one token for each generating sequence, then prompt tokens of sequences still being
   prefilled, oldest first, up to `n_batch` tokens in all: a long prompt is evaluated over
   several steps and never stalls the running streams for more than one chunk;
4. decode once, then sample each sequence that asked for logits with its own chain; a sequence
   that ends (end of generation, its token budget) leaves its slot at once.

A job asking for `n` choices is `n` sequences, admitted together once `n` slots are free (as
llama.cpp's server and vLLM admit a request only with room for all of its sequences; jobs wait in
arrival order, so a big one is not passed over for ever): the first evaluates the prompt, and in
the step that ends it the others get a copy of its cells (`llama_memory_seq_cp`) and draw their
first tokens from the same logits, each with its own sampler. A sequence that asks for logprobs
gets each token's from the logits of its batch row: the model's own distribution, log-softmax over
the whole vocabulary, before penalties, biases, truncation and temperature (vLLM's default).

A slot's cells are its own (the context gives each sequence id a KV stream of its own, so they
hold nothing anyone else could use): when a job ends on its own, they keep its prompt and answer,
and the next job to take the slot evaluates only what differs from them, as llama.cpp's server
does. The chat template's head is the same for every chat request, and a conversation's next turn
starts with the previous one. A new job takes the free slot that holds its longest prefix, the
lowest id on a tie: llama.cpp puts only consecutive sequence ids into one micro-batch, so low ids
keep a step in one piece. A seeded job evaluates its whole prompt, so that the same seed and
prompt give the same text (a prompt evaluated in two pieces gives slightly different logits).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import llama_cpp
import numpy as np

from shared.protocol import FinishReason
from worker.backends import Piece

DONE = object()
"""Put on a sequence's queue after its last token (a sequence that is one of several choices
ends with a `Piece` giving its finish reason instead)."""

PENALTY_LAST_N = 64  # llama-cpp-python's `last_n_tokens_size`, which every request had before
TOP_K = 40  # llama-cpp-python's defaults, as every request had them before batching
MIN_P = 0.05


@dataclass(frozen=True)
class Sampling:
    """One request's sampling parameters."""

    temperature: float
    top_p: float
    seed: int | None
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    min_tokens: int
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token, bias) pairs, added to the logits."""
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(eq=False)
class Sequence:
    """One job's generation. Built on the event loop; below the line, only the decode thread
    touches it, and only the event loop reads `queue`."""

    prompt: list[int]
    max_new: int
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    index: int = 0
    """Its choice, of `choices`."""
    choices: int = 1
    followers: list[Sequence] = field(default_factory=list)
    """The job's other choices, if it is the first: they start from a copy of its prompt."""
    leader: Sequence | None = None
    """The first choice, if it is another: it takes no part in evaluating the prompt."""
    # decode thread only
    slot: Slot | None = None
    order: int = 0
    next_token: int | None = None
    """The last sampled token, to be evaluated in the next step."""
    produced: int = 0
    sampler: int | None = None
    eog_blocked: bool = False


@dataclass(eq=False)
class Slot:
    """One sequence id of the context and what its KV cells hold."""

    id: int
    cached: list[int] = field(default_factory=list)
    """The tokens whose cells are in this slot's KV cache, by position."""
    seq: Sequence | None = None


class Batcher:
    """The decode thread and the sequences it steps."""

    def __init__(
        self,
        ctx: llama_cpp.llama_context_p,
        vocab: llama_cpp.llama_vocab_p,
        n_seq: int,
        n_batch: int,
    ) -> None:
        self._ctx = ctx
        self._vocab = vocab
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._eog = frozenset(
            t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)
        )
        self._no_eog = (llama_cpp.llama_logit_bias * len(self._eog))(
            *(llama_cpp.llama_logit_bias(t, float("-inf")) for t in sorted(self._eog))
        )
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._token_text: dict[int, dict[str, Any]] = {}
        """Token -> its `token` and `bytes`, as logprob entries show it."""
        self._slots = [Slot(i) for i in range(n_seq)]
        self._order = count()
        self._pending: list[list[Sequence]] = []
        """Jobs waiting for slots, in arrival order: each its choices' sequences."""
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="llama-decode", daemon=True)
        self._thread.start()

    @property
    def n_seq(self) -> int:
        return len(self._slots)

    def submit(self, job: list[Sequence]) -> None:
        """A job's sequences: one, or its choices, the first with the others as followers."""
        leader, *followers = job
        leader.followers = followers
        for seq in followers:
            seq.leader = leader
        with self._wake:
            self._pending.append(job)
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Its reader is gone: the sequence leaves before the next decode (a no-op if it ended)."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)

    # --- the decode thread ---

    def _running(self) -> list[Sequence]:
        return [slot.seq for slot in self._slots if slot.seq is not None]

    def _run(self) -> None:
        out: list[tuple[Sequence, object]] = []  # the last step's tokens, not yet handed over
        while True:
            with self._wake:
                while not (self._closing or self._pending or self._running()):
                    self._wake.wait()
                if self._closing:
                    break
                joining = [job for job in self._pending if not all(s.cancelled for s in job)]
                self._pending.clear()
            try:
                for seq in self._running():
                    if seq.cancelled:
                        self._leave(seq, keep=False)
                if waiting := self._admit(joining):
                    with self._wake:  # more jobs than slots: the rest wait for one
                        self._pending[:0] = waiting
                self._step(out)
            except Exception as exc:  # handed to every reader, raised there as BackendError
                unadmitted = [s for job in joining for s in job if s.slot is None]
                for seq in [*self._running(), *unadmitted]:
                    self._leave(seq, keep=False)
                    out.append((seq, exc))
                with self._wake:
                    self._pending = [job for job in self._pending if job not in joining]
            if not self._running():
                self._deliver(out)
        for seq in [*self._running(), *(s for job in self._pending for s in job)]:
            self._leave(seq, keep=False)
            out.append((seq, RuntimeError("the backend closed")))
        self._deliver(out)

    def _admit(self, joining: list[list[Sequence]]) -> list[list[Sequence]]:
        for n, job in enumerate(joining):
            free = [slot for slot in self._slots if slot.seq is None]
            if len(free) < len(job):
                return joining[n:]
            leader, *followers = job
            slot = max(free, key=lambda s: (self._reusable(s, leader), -s.id))
            reuse = self._reusable(slot, leader)
            if not llama_cpp.llama_memory_seq_rm(self._memory, slot.id, reuse, -1):
                llama_cpp.llama_memory_seq_rm(self._memory, slot.id, -1, -1)
                reuse = 0
            del slot.cached[reuse:]
            self._take(leader, slot)
            others = sorted((s for s in free if s is not slot), key=_by_id)
            for seq, other in zip(followers, others, strict=False):
                self._take(seq, other)  # its cells are replaced by the leader's prompt's
        return []

    def _take(self, seq: Sequence, slot: Slot) -> None:
        slot.seq, seq.slot = seq, slot
        seq.order = next(self._order)
        seq.sampler = self._sampler(seq.sampling)
        seq.eog_blocked = seq.sampling.min_tokens > 0

    @staticmethod
    def _reusable(slot: Slot, seq: Sequence) -> int:
        """How many of the slot's cached tokens the sequence's prompt can keep (it evaluates at
        least its last token: that gives the logits of its first)."""
        if seq.sampling.seed is not None:
            return 0
        same = 0
        for cached, token in zip(slot.cached, seq.prompt[:-1], strict=False):
            if cached != token:
                break
            same += 1
        return same

    def _sampler(self, s: Sampling) -> int:
        """The chain llama-cpp-python built for every request before: penalties over the last 64
        generated tokens, then greedy, or top-k, top-p, min-p, temperature and a seeded draw.
        Each sequence has its own, so its random stream does not depend on its neighbours."""
        chain: int = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )

        def add(sampler: int) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        if s.min_tokens > 0:
            # First in the chain, removed once min_tokens are out (see _sample).
            no_eog = self._no_eog
            add(llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(no_eog), no_eog))
        if s.logit_bias:
            # Copied by llama.cpp: the array need not outlive this call.
            biases = (llama_cpp.llama_logit_bias * len(s.logit_bias))(
                *(llama_cpp.llama_logit_bias(token, bias) for token, bias in s.logit_bias)
            )
            add(llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(biases), biases))
        if s.repeat_penalty >= 1 and s.presence_penalty >= 0 and s.frequency_penalty >= 0:
            # Penalties that only lower logits, on the whole vocabulary, cost 150 us a token
            # here (a hash lookup per entry). The 104 best logits hold the chain's 40 best
            # after such penalties (at most 64 tokens are penalized), so the result is the same.
            add(llama_cpp.llama_sampler_init_top_k(TOP_K + PENALTY_LAST_N))
        add(
            llama_cpp.llama_sampler_init_penalties(
                self._n_vocab,
                PENALTY_LAST_N,
                s.repeat_penalty,
                s.frequency_penalty,
                s.presence_penalty,
            )
        )
        if s.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(TOP_K))
            add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
            add(llama_cpp.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _step(self, out: list[tuple[Sequence, object]]) -> None:
        """Decodes one step; `out` holds the last step's tokens on the way in (handed over during
        this step) and this step's on the way out."""
        running = self._running()
        if not running:
            return
        # What each sequence puts in: its last token, or the next chunk of its prompt.
        inputs: dict[Slot, list[int]] = {}
        for seq in running:
            if seq.next_token is not None:
                assert seq.slot is not None
                inputs[seq.slot] = [seq.next_token]
        room = self._n_batch - len(inputs)
        for seq in sorted(running, key=_by_order):
            slot = seq.slot
            assert slot is not None
            if room <= 0:
                break
            if seq.next_token is None and seq.leader is None:  # still prefilling
                inputs[slot] = seq.prompt[len(slot.cached) : len(slot.cached) + room]
                room -= len(inputs[slot])

        batch = self._batch
        n = 0
        outputs: list[tuple[Sequence, int]] = []
        for slot in sorted(inputs, key=_by_id):  # ids in order: one micro-batch where possible
            tokens, start = inputs[slot], len(slot.cached)
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.id
                batch.logits[n] = 0
                n += 1
            owner = slot.seq
            assert owner is not None
            if start + len(tokens) >= len(owner.prompt):  # its next token is due
                batch.logits[n - 1] = 1
                outputs.append((owner, n - 1))
        batch.n_tokens = n
        # The last step's tokens go to the event loop now, the last thing before the decode
        # lets go of the GIL: the loop's work on them overlaps the decode instead of delaying it.
        self._deliver(out)
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for slot, tokens in inputs.items():
            slot.cached += tokens
        for seq, index in outputs:
            self._sample(seq, index, out)

    def _sample(self, seq: Sequence, index: int, out: list[tuple[Sequence, object]]) -> None:
        """Samples the sequence's next token from batch row `index`; a leader whose prompt
        this row ends gives its followers their copy of the prompt and their first tokens."""
        assert seq.sampler is not None
        assert seq.slot is not None
        followers, seq.followers = seq.followers, []  # only with its first token
        followers = [f for f in followers if f.slot is not None and f.slot.seq is f]
        for follower in followers:
            assert follower.slot is not None
            # Done by the next decode, before it computes anything.
            llama_cpp.llama_memory_seq_cp(self._memory, seq.slot.id, follower.slot.id, -1, -1)
            follower.slot.cached = list(seq.slot.cached)
        if seq.eog_blocked and seq.produced >= seq.sampling.min_tokens:
            llama_cpp.llama_sampler_free(llama_cpp.llama_sampler_chain_remove(seq.sampler, 0))
            seq.eog_blocked = False
        token: int = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, index)
        seq.produced += 1
        if token in self._eog:
            self._end(seq, "stop", out)
        else:
            out.append((seq, self._piece_of(seq, token, index)))
            if seq.produced >= seq.max_new:
                self._end(seq, "length", out)
            else:
                seq.next_token = token
        for follower in followers:
            self._sample(follower, index, out)

    def _end(self, seq: Sequence, reason: FinishReason, out: list[tuple[Sequence, object]]) -> None:
        self._leave(seq, keep=True)
        out.append((seq, Piece(b"", seq.index, finish_reason=reason) if seq.choices > 1 else DONE))

    def _piece_of(self, seq: Sequence, token: int, index: int) -> bytes | Piece:
        text = self._bytes(token)
        if not seq.sampling.logprobs:
            return text if seq.choices == 1 else Piece(text, seq.index)
        return Piece(text, seq.index, [self._logprobs(token, index, seq.sampling.top_logprobs)])

    def _logprobs(self, token: int, index: int, top: int) -> dict[str, Any]:
        """OpenAI's `logprobs.content` entry of `token`, drawn from batch row `index`: the
        model's log-probabilities (log-softmax of the raw logits over the whole vocabulary)."""
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,)
        )
        peak = logits.max()
        log_total = float(peak) + float(np.log(np.exp(logits - peak).sum()))
        entry = self._token_entry(token) | {"logprob": float(logits[token]) - log_total}
        alternatives: list[dict[str, Any]] = []
        if top:
            best = np.argpartition(logits, -top)[-top:]
            for alt in best[np.argsort(-logits[best], kind="stable")]:
                logprob = float(logits[alt]) - log_total
                alternatives.append(self._token_entry(int(alt)) | {"logprob": logprob})
        return entry | {"top_logprobs": alternatives}

    def _token_entry(self, token: int) -> dict[str, Any]:
        """`token` and `bytes` of a logprob entry; a token that is part of a UTF-8 character
        shows U+FFFD in `token`, its bytes exactly."""
        entry = self._token_text.get(token)
        if entry is None:
            raw = self._bytes(token)
            entry = {"token": raw.decode(errors="replace"), "bytes": list(raw)}
            self._token_text[token] = entry
        return entry

    def _bytes(self, token: int) -> bytes:
        n: int = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, 256, 0, False)
        if n < 0:  # longer than any piece of a real vocabulary
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, False)
            return buffer.raw[:n]
        return self._piece.raw[:n]

    def _leave(self, seq: Sequence, keep: bool) -> None:
        """The sequence gives up its slot and sampler at once. Its cells stay as the slot's
        cache if it ended on its own (`keep`); otherwise they are removed now."""
        slot = seq.slot
        if slot is None or slot.seq is not seq:
            return
        if not keep:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.id, -1, -1)
            slot.cached.clear()
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        slot.seq = None

    @staticmethod
    def _deliver(out: list[tuple[Sequence, object]]) -> None:
        """Hands over and empties `out`: one call per event loop per step, not one per token."""
        by_loop: defaultdict[asyncio.AbstractEventLoop, list[tuple[Sequence, object]]]
        by_loop = defaultdict(list)
        for seq, item in out:
            if not seq.cancelled:
                by_loop[seq.loop].append((seq, item))
        out.clear()
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody reads
                loop.call_soon_threadsafe(_put, items)


def _put(items: list[tuple[Sequence, object]]) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


def _by_order(seq: Sequence) -> int:
    return seq.order


def _by_id(slot: Slot) -> int:
    return slot.id
