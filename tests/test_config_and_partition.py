"""Configuration checks and partitioners: bad input is refused before any compute."""

from __future__ import annotations

import pytest

from pcpp_runtime import ConfigError, ParallelConfig, ShapeError
from pcpp_runtime.partition import RowPartitioner, WeightedRowPartitioner
from pcpp_runtime.policies import portion_rows


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"policy": "fastest"}, ["unknown policy 'fastest'", "sync", "partial"]),
        ({"portion": 0.0}, ["portion", "(0, 1]", "0.0"]),
        ({"portion": 1.5}, ["portion", "1.5"]),
        ({"portion": float("nan")}, ["portion"]),
        ({"warmup_steps": -1}, ["warmup_steps", "-1"]),
        ({"policy": "full", "warmup_steps": 0}, ["at least one", "warm-up"]),
        ({"partitioner": "columns"}, ["unknown partitioner 'columns'", "rows"]),
        ({"weights": (1.0, -2.0)}, ["weights", "positive"]),
        ({"timeout_s": 0}, ["timeout_s"]),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, words):
    with pytest.raises(ConfigError) as info:
        ParallelConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_world_size_below_one_is_refused():
    with pytest.raises(ConfigError, match="world size must be an integer >= 1, got 0"):
        ParallelConfig().check_world_size(0)


def test_sync_and_none_need_no_warmup():
    assert ParallelConfig(policy="sync", warmup_steps=0).warmup_steps == 0


@pytest.mark.parametrize("height,world,expected", [
    (32, 2, [(0, 16), (16, 32)]),
    (20, 3, [(0, 8), (8, 16), (16, 20)]),  # 5 units of 4 rows: 2, 2, 1
    (20, 4, [(0, 8), (8, 12), (12, 16), (16, 20)]),
])
def test_rows_split_unevenly_on_aligned_boundaries(height, world, expected):
    plan = RowPartitioner().plan(height, 24, world, alignment=4)
    assert list(plan.bounds) == expected
    assert all(start % 4 == 0 for start, _ in plan.bounds)


def test_too_few_rows_names_what_works():
    with pytest.raises(ShapeError) as info:
        RowPartitioner().plan(12, 12, 4, alignment=4)
    message = str(info.value)
    assert "at least 16" in message and "at most 3 rank(s)" in message


def test_unaligned_height_names_the_nearest_shapes():
    with pytest.raises(ShapeError, match="nearest that work: 28 or 32"):
        RowPartitioner().plan(30, 32, 2, alignment=4)


def test_weighted_partitioner_gives_the_rows_asked_for():
    plan = WeightedRowPartitioner().plan(64, 64, 3, alignment=8, weights=(2, 1, 1))
    assert [plan.rows(r) for r in range(3)] == [32, 16, 16]


@pytest.mark.parametrize("portion,rows,expected", [(0.3, 16, 5), (0.3, 8, 2), (0.01, 8, 1), (1.0, 7, 7), (0.5, 5, 3)])
def test_portion_rows_rounds_half_up_with_at_least_one(portion, rows, expected):
    assert portion_rows(portion, rows) == expected
