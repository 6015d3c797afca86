"""`tune_collector`: what is alive when serving starts leaves the collector's generations (garbage does not),
and the young generation is collected less often."""

from __future__ import annotations

import gc
import weakref

from bastion.listen import YOUNG_THRESHOLD, tune_collector


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_tune_collector_collects_cycles_then_freezes_what_is_alive() -> None:
    alive = _Node()
    cycle = _Node()
    cycle.other = cycle  # garbage only a collection frees
    gone = weakref.ref(cycle)
    del cycle
    thresholds = gc.get_threshold()
    try:
        tune_collector()
        assert gone() is None  # collected first, not frozen
        assert gc.get_freeze_count() > 0
        assert not any(obj is alive for obj in gc.get_objects())  # in the permanent generation: never walked again
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *thresholds[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
