"""TAID's schedule: monotone, bounded by [t_start, t_end], floored by the line, faster when
the loss falls fast, restored exactly from its state, the same on every process."""

from __future__ import annotations

import itertools
import math

import pytest

from knowpress.methods.distill.taid import TAID, TAIDSchedule


def _run(schedule: TAIDSchedule, losses: list[float]) -> list[float]:
    return [schedule.update(loss) for loss in losses]


def test_monotone_bounded_and_floored_by_the_line() -> None:
    schedule = TAID(name="taid").schedule(total_steps=200)
    losses = [3.0 * math.exp(-i / 40) + 0.1 * math.sin(i) for i in range(260)]
    ts = _run(schedule, losses)
    assert all(b >= a for a, b in itertools.pairwise(ts))
    assert all(0.4 <= t <= 1.0 for t in ts)
    assert all(t >= schedule.linear(i + 1) - 1e-12 for i, t in enumerate(ts))
    assert ts[-1] == 1.0  # past the last step the line is at t_end


def test_fast_progress_moves_t_above_the_line() -> None:
    fast = TAID(name="taid", alpha=0.05).schedule(total_steps=1000)
    flat = TAID(name="taid", alpha=0.05).schedule(total_steps=1000)
    t_fast = _run(fast, [10.0 * 0.9**i for i in range(50)])
    t_flat = _run(flat, [10.0 + 0.5 * (i % 2) for i in range(50)])
    assert t_fast[-1] > t_flat[-1] > fast.linear(50)


def test_the_state_round_trips_and_continues_identically() -> None:
    losses = [2.0 / (1 + i) for i in range(40)]
    whole = TAID(name="taid", alpha=0.01).schedule(total_steps=60)
    expected = _run(whole, losses)
    first = TAID(name="taid", alpha=0.01).schedule(total_steps=60)
    _run(first, losses[:25])
    resumed = TAID(name="taid", alpha=0.01).schedule(total_steps=60)
    resumed.load_state_dict(dict(first.state_dict()))
    assert _run(resumed, losses[25:]) == expected[25:]


def test_processes_with_different_losses_agree_through_the_reduce() -> None:
    per_process = [[1.0 / (1 + i) for i in range(20)], [3.0 / (1 + i) for i in range(20)]]
    schedules = [TAID(name="taid", alpha=0.02).schedule(total_steps=100) for _ in range(2)]
    for step in range(20):
        mean = sum(p[step] for p in per_process) / 2
        for rank, schedule in enumerate(schedules):
            schedule.update(per_process[rank][step], reduce=lambda _loss, m=mean: m)
    assert schedules[0].state_dict() == schedules[1].state_dict()


def test_t_start_above_t_end_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"t_start 0\.9 is above t_end 0\.5"):
        TAID(name="taid", t_start=0.9, t_end=0.5)
