"""`cluster bench chaos`'s per-fault accounting (bench/live/chaos.py): which requests a
fault's window holds, and the stalls attributed to its migrated streams."""

from __future__ import annotations

from bench.live.chaos import FaultRecord, migrated_stalls, parse_faults
from bench.live.streams import StreamResult


def sample(started_at: float, seconds: float, max_gap_s: float = 0.1) -> StreamResult:
    return StreamResult(status=200, started_at=started_at, seconds=seconds, max_gap_s=max_gap_s)


def test_a_fault_window_holds_the_requests_in_flight_from_the_hit_to_the_heal() -> None:
    fault = FaultRecord("kill", at=20.0, hit=100.0, healed=160.0)
    assert fault.in_window(sample(95.0, 10.0), end=300.0)  # in flight at the hit
    assert fault.in_window(sample(150.0, 20.0), end=300.0)  # began before the heal
    assert not fault.in_window(sample(80.0, 10.0), end=300.0)  # done before the hit
    assert not fault.in_window(sample(170.0, 5.0), end=300.0)  # began after the heal


def test_an_unhealed_fault_runs_to_the_end_and_an_unfired_one_holds_nothing() -> None:
    unhealed = FaultRecord("drain", at=200.0, hit=250.0)
    assert unhealed.in_window(sample(280.0, 5.0), end=300.0)
    assert not FaultRecord("stop", at=400.0).in_window(sample(280.0, 5.0), end=300.0)


def test_migrated_stalls_are_the_largest_gaps_as_many_as_were_migrated() -> None:
    samples = [sample(0.0, 1.0, gap) for gap in (0.2, 3.0, 0.1, 5.0, 0.3)]
    assert migrated_stalls(samples, 2) == [5.0, 3.0]
    assert migrated_stalls(samples, 0) == []


def test_a_schedule_is_ordered_by_time_and_may_repeat_a_fault() -> None:
    assert parse_faults("drain@300,kill@20,stop@120,kill@500") == [
        ("kill", 20.0),
        ("stop", 120.0),
        ("drain", 300.0),
        ("kill", 500.0),
    ]
