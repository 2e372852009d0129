"""When a federated round stops waiting for its sites: the deadline policy, free of FLARE so it can be unit-tested.

A round closes when every sampled site answered (FLARE ends the task then), or when ``deadline`` seconds passed and
at least ``min_sites`` usable updates arrived. Below the minimum at the deadline it waits on, with a warning naming
the missing sites every ``warn_every`` seconds, until the minimum arrives (close) or ``time_limit`` passes (close
with what arrived, which stops the job when it is below the minimum). Never a silent stall: without a deadline the
same warning comes every ``warn_every`` seconds while sites are awaited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WAIT, CLOSE, GIVE_UP = "wait", "close", "give_up"


def check_seconds(name: str, value: float) -> float:
    """``value`` as a float of seconds >= 0 (0 switches the feature off).

    Raises:
        ValueError: not a finite number >= 0; the message names ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 (0: off), got {value!r}")
    return float(value)


@dataclass
class RoundClock:
    """The waiting rules of one round, fed the elapsed time and what has arrived.

    Args:
        sampled: the sites the round's task was sent to.
        min_sites: the fewest usable updates that let the round close at the deadline.
        deadline: seconds after which the round closes if ``min_sites`` usable updates arrived; 0: wait for all.
        time_limit: seconds after which the round closes whatever arrived; 0: none.
        warn_every: seconds between warnings while the round waits past its deadline (or, with no deadline, while
            it waits at all).
    """

    sampled: list[str]
    min_sites: int
    deadline: float = 0.0
    time_limit: float = 0.0
    warn_every: float = 300.0
    usable: set[str] = field(default_factory=set)
    replied: set[str] = field(default_factory=set)
    _next_warning: float = field(default=math.nan, init=False)

    def __post_init__(self) -> None:
        self._next_warning = self.deadline or self.warn_every

    def missing(self) -> list[str]:
        """Sampled sites that have not replied yet, in sampling order."""
        return [site for site in self.sampled if site not in self.replied]

    def decide(self, elapsed: float) -> str:
        """WAIT, CLOSE (enough usable updates, deadline passed) or GIVE_UP (time limit passed)."""
        if self.time_limit and elapsed >= self.time_limit:
            return GIVE_UP
        if self.deadline and elapsed >= self.deadline and len(self.usable) >= self.min_sites:
            return CLOSE
        return WAIT

    def warning_due(self, elapsed: float) -> bool:
        """True at most once per ``warn_every`` seconds once the round is overdue (see the module)."""
        if not self.warn_every or elapsed < self._next_warning:
            return False
        self._next_warning = elapsed + self.warn_every
        return True
