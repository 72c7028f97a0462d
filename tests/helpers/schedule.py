"""The order the collected tests run in: the slow ones first, on every pytest-xdist worker.

Why: ``--dist worksteal`` hands each worker a contiguous share of the collection
(worker k gets ``remaining // (workers - k)`` items), then lets an idle worker steal the
tail of a busy one's queue. In file order the slowest tests (a full ``dvc repro``, five
seeds, a killed and resumed run: 20-160 s each) sit in the middle and the end of the
shares, so the suite ends with one of them running on one core while the other has
nothing left to take. Longest first is the classic remedy (LPT scheduling): start every
worker on its slow tests, and the short ones at the end balance the finish. Measured alone
on 2 cores (2026-11-27, `pytest -n 2 --dist worksteal`): 553 s in file order, 522 s this way
with 9 % more test work (the tests' durations summed to 928 and 1,010 s); the time beyond
half of that work, a core idle at the end, went from 89 s to 17 s.

Only tests that can move without cost are moved: a test with a module- or class-scoped
fixture stays in its module's run, since taking it out would set that fixture up twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def shares(total: int, workers: int) -> list[int]:
    """The sizes of the contiguous shares xdist's worksteal gives ``workers`` at the start."""
    sizes, left = [], total
    for k in range(workers):
        size = left // (workers - k)
        sizes.append(size)
        left -= size
    return sizes


def slow_first(items: Sequence[T], movable: Callable[[T], bool], workers: int) -> list[T]:
    """``items`` reordered so that each worker's share starts with its part of the movable ones.

    The movable items are dealt round-robin (in their collection order), then each share is
    filled up with the other items in their collection order, so that modules stay together
    as in xdist's own split. With one worker: the movable items first, then the rest.
    """
    workers = max(1, workers)
    heavy = [it for it in items if movable(it)]
    rest = [it for it in items if not movable(it)]
    order: list[T] = []
    for k, size in enumerate(shares(len(items), workers)):
        dealt = heavy[k::workers]
        take = max(0, size - len(dealt))
        order += dealt + rest[:take]
        del rest[:take]
    return order + rest
