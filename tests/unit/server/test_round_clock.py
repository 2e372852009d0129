import pytest

from fedseg3d.server.round_clock import CLOSE, GIVE_UP, WAIT, RoundClock


def test_closes_at_the_deadline_once_the_minimum_arrived():
    clock = RoundClock(["site-1", "site-2", "site-3"], min_sites=2, deadline=10)
    clock.usable.add("site-1")
    clock.replied.add("site-1")
    assert clock.decide(5) == WAIT
    assert clock.decide(11) == WAIT, "below the minimum at the deadline: wait on"
    clock.usable.add("site-3")
    clock.replied.add("site-3")
    assert clock.decide(11) == CLOSE
    assert clock.missing() == ["site-2"]


def test_without_a_deadline_waits_for_all_but_the_time_limit_ends_the_round():
    clock = RoundClock(["site-1", "site-2"], min_sites=1, deadline=0, time_limit=100)
    clock.usable.update(["site-1"])
    assert clock.decide(99) == WAIT
    assert clock.decide(100) == GIVE_UP


def test_overdue_rounds_warn_periodically_never_silently():
    clock = RoundClock(["site-1", "site-2"], min_sites=2, deadline=10, warn_every=30)
    due = [t for t in range(0, 120) if clock.warning_due(t)]
    assert due == [10, 40, 70, 100], "first warning at the deadline, then every period"
    no_deadline = RoundClock(["site-1"], min_sites=1, warn_every=30)
    assert [t for t in range(0, 70) if no_deadline.warning_due(t)] == [30, 60]


@pytest.mark.parametrize("bad", [-1, float("nan"), "10", True])
def test_bad_seconds_are_refused(bad):
    from fedseg3d.server.round_clock import check_seconds

    with pytest.raises(ValueError, match="round_deadline must be"):
        check_seconds("round_deadline", bad)
