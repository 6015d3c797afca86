"""`freeze_startup_heap`: what is alive when serving starts leaves the collector's generations; garbage does not."""

from __future__ import annotations

import gc
import weakref

from bastion.listen import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_freeze_startup_heap_collects_cycles_then_freezes_what_is_alive() -> None:
    alive = _Node()
    cycle = _Node()
    cycle.other = cycle  # garbage only a collection frees
    gone = weakref.ref(cycle)
    del cycle
    try:
        freeze_startup_heap()
        assert gone() is None  # collected first, not frozen
        assert gc.get_freeze_count() > 0
        assert not any(obj is alive for obj in gc.get_objects())  # in the permanent generation: never walked again
    finally:
        gc.unfreeze()
