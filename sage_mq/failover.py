"""One request's walk over the replicas of its model: which replica next, and when to stop.

Pure (no I/O), beside :mod:`sage_mq.routing`, which picks among replicas. The gateway's proxy,
the client's direct transport and the batch runner all walk replicas through it, so a replica
that refuses the connection, breaks it before the first byte, or answers 502/503/504 is left
for another the same way everywhere; what reached the caller is never sent twice (the callers
stop walking once a byte of the answer is out).
"""

from __future__ import annotations

from collections.abc import Sequence

from sage_mq.routing import NoReplica, Replica, Router

RETRY_STATUS = frozenset({502, 503, 504})
"""Answers that say this replica cannot serve now, while another may: tried elsewhere."""


def worth_another(status: int) -> bool:
    """Whether an answer with ``status`` is left for another replica (nothing relayed yet)."""
    return status in RETRY_STATUS


class Failover:
    """The replicas one request has tried, and why the last one gave no answer."""

    def __init__(self, router: Router, model: str, *, last: str = "no replica answered") -> None:
        self.router = router
        self.model = model
        self.tried: set[str] = set()
        self.last = last
        """Why the last replica tried gave no answer (or what was before this walk)."""

    def choose(self, replicas: Sequence[Replica]) -> Replica:
        """The next replica to try, by the router's policy; :class:`NoReplica` once every one
        was tried (its message says so, with the last failure)."""
        try:
            return self.router.choose(replicas, exclude=self.tried)
        except NoReplica:
            raise NoReplica(self.exhausted()) from None

    def failed(self, replica: Replica, why: str) -> None:
        """``replica`` gave no answer the caller may see (``why``): try another."""
        self.tried.add(replica.engine_id)
        self.last = f"{replica.engine_id}: {why}"

    def last_chance(self, replicas: Sequence[Replica]) -> bool:
        """Whether no untried replica would be left after this one: then a 502/503/504 is the
        answer to relay, not a reason to go on."""
        return len(self.tried) + 1 >= len(replicas)

    def exhausted(self) -> str:
        """Why the walk ended with no answer, for the caller."""
        return (
            f"every RUNNING replica of {self.model!r} failed ({len(self.tried)} tried): "
            f"{self.last}; try again shortly (engines restart on their own)"
        )
