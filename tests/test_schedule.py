"""The suite's own test order (helpers/schedule.py): every xdist worker starts on slow tests."""

from __future__ import annotations

import pytest
from helpers.schedule import shares, slow_first


@pytest.mark.parametrize("total,workers", [(0, 2), (1, 2), (7, 2), (734, 2), (10, 3), (5, 1)])
def test_shares_are_what_worksteal_hands_out(total, workers):
    sizes = shares(total, workers)
    assert sum(sizes) == total and len(sizes) == workers
    assert max(sizes) - min(sizes) <= 1
    # xdist's WorkStealingScheduling.check_schedule: len(pending) // nodes_remaining, in turn
    left = total
    for k, size in enumerate(sizes):
        assert size == left // (workers - k)
        left -= size


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_share_starts_with_its_slow_items_and_the_rest_keep_their_order(workers):
    items = [f"m{i // 10}::t{i}" + ("-slow" if i % 7 == 3 else "") for i in range(60)]
    slow = [it for it in items if it.endswith("-slow")]
    order = slow_first(items, lambda it: it.endswith("-slow"), workers)

    assert sorted(order) == sorted(items)  # each item once
    assert [it for it in order if it not in slow] == [it for it in items if it not in slow]
    start = 0
    for k, size in enumerate(shares(len(items), workers)):
        share = order[start:start + size]
        start += size
        dealt = slow[k::workers]
        assert share[:len(dealt)] == dealt, (k, share)
        assert not any(it in slow for it in share[len(dealt):])


def test_nothing_movable_keeps_the_collection_order():
    items = list(range(20))
    assert slow_first(items, lambda it: False, 2) == items
