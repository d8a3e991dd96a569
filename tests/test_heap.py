"""Both processes settle their heap once started (shared/heap.py): the start-up heap frozen,
young collections at `SLUICE_GC_THRESHOLD` new objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from shared import heap
from shared.settings import Settings
from tests.procs import Stack, eventually


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """This test process's collector as it was, whatever the test did to it."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_the_heap_and_sets_the_young_threshold(restored_gc: None) -> None:
    _, gen1, gen2 = gc.get_threshold()
    heap.settle(12_345)
    assert gc.get_freeze_count() > 1000  # this process's modules, pytest's included
    assert gc.get_threshold() == (12_345, gen1, gen2)


def test_settle_with_no_threshold_keeps_pythons(restored_gc: None) -> None:
    before = gc.get_threshold()
    heap.settle(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() > 0


async def test_api_and_worker_settle_their_heaps_once_started(synthetic: Stack) -> None:
    settled = f"young collections every {Settings.model_fields['gc_threshold'].default} new"
    for proc in (synthetic.api, *synthetic.workers):
        await eventually(lambda proc=proc: settled in proc.log_text(), proc.name)
