"""Python's garbage collector, set once a process has started: its heap is then mostly what it
keeps for good (modules, the app, its schemas, a model's Python side).

Streams make many container objects (tasks, futures, coroutine frames, dicts) that live as long
as a stream does. At CPython's default threshold, a young-generation collection every 700 net
new ones, a burst of requests triggers a collection every few requests: each walks the objects
the burst still holds and promotes them, to be walked again by the older generations' passes.
With a higher threshold most of them have died by reference counting before any collection
comes. Freezing the start-up heap takes it out of every full collection, as vLLM
(`freeze_gc_heap`) and SGLang (`freeze_gc`) do with theirs.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("sluice")


def settle(gen0_threshold: int) -> None:
    """Collects once, freezes what is left, and sets the young generation's threshold (0:
    Python's own); the older generations keep theirs."""
    gc.collect()
    gc.freeze()
    if gen0_threshold:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
    log.info(
        "heap settled: %d objects frozen; young collections every %d new objects",
        gc.get_freeze_count(),
        gc.get_threshold()[0],
    )
