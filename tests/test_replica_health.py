"""The gateway's board of failed replicas (cluster.routing.replica_health): marks expire,
and a mark is acted on only while a request could go elsewhere."""

from __future__ import annotations

from cluster.routing.replica_health import ReplicaHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_marks_expire() -> None:
    clock = Clock()
    health = ReplicaHealth(clock)
    health.mark_failed("a", 30)
    assert health.is_excluded("a") and health.usable(["a", "b"]) == {"b"}
    clock.now += 31
    assert not health.is_excluded("a") and health.usable(["a", "b"], also_excluded=["b"]) == {"a"}


def test_an_alternative_is_a_usable_other_replica_of_the_request_pools() -> None:
    health = ReplicaHealth(Clock())
    assert health.has_alternative("a", ["standard"])  # no router reported the pool: cannot tell
    health.set_pool("standard", ["a", "b"])
    health.set_pool("long", ["l"])
    assert health.has_alternative("a", ["standard"])
    health.mark_failed("b", 30)
    assert not health.has_alternative("a", ["standard"])  # b is marked too: wait on a
    assert health.has_alternative("a", ["standard", "long"])  # the last attempt may spill
    assert not health.has_alternative("a", ["standard", "long"], also_excluded=["l"])  # it failed there
    health.set_pool("standard", ["a", "b", "c"])  # a replacement joined
    assert health.has_alternative("a", ["standard"])
    assert health.has_alternative("x", ["unknown-pool"])
