"""DecodeExposure: which earlier decodes a prefill started at a given virtual time stalls."""

from __future__ import annotations

from cluster.routing.decode_exposure import DecodeExposure


def test_counts_decodes_still_running_when_the_prefill_starts() -> None:
    d = DecodeExposure()
    d.add(decode_end=1.0, weight=0.25)  # a 5-token reply, done by t=1
    d.add(decode_end=10.0, weight=0.01)  # a long reply
    assert d.at(0.5) == 0.26
    assert abs(d.at(2.0) - 0.01) < 1e-12  # the short one is over: never counted again
    assert abs(d.at(3.0) - 0.01) < 1e-12
    assert d.at(11.0) == 0.0
    assert d.live == 0 and not d.heap


def test_a_finished_request_leaves_at_once() -> None:
    d = DecodeExposure()
    a = d.add(5.0, 0.5)
    d.add(6.0, 0.1)
    d.remove(a)
    d.remove(a)  # twice is harmless
    assert abs(d.at(0.0) - 0.1) < 1e-12
    assert d.live == 1


def test_nothing_left_clears_the_heap() -> None:
    d = DecodeExposure()
    entries = [d.add(float(k), 0.1) for k in range(100)]
    for e in entries:
        d.remove(e)
    assert d.total == 0.0 and not d.heap
