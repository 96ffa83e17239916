"""Which engines the leader knows to be RUNNING with no failed probe: their reports cost nothing."""

from __future__ import annotations


class SteadyEngines:
    """Engines read from Redis as RUNNING with no failed probe, for ``ttl_s``.

    A healthy probe of such an engine changes nothing, so at 1,000 nodes reporting every tick
    the scheduler judges most reports without a round trip. Only this scheduler's own probe
    handling makes a record count failures, and it forgets the engine as it does; the time
    limit bounds what a write from elsewhere (a deposed leader's last one) could hide.
    """

    def __init__(self, ttl_s: float = 30.0) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[tuple[str, str], float] = {}
        self._pruned = 0.0

    def known(self, node_id: str, engine_id: str, now: float) -> bool:
        seen = self._seen.get((node_id, engine_id))
        return seen is not None and now - seen < self.ttl_s

    def remember(self, node_id: str, engine_id: str, now: float) -> None:
        self._seen[(node_id, engine_id)] = now
        if now - self._pruned > self.ttl_s:  # engines that went away leave no trace for long
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.ttl_s}
            self._pruned = now

    def forget(self, node_id: str, engine_id: str) -> None:
        self._seen.pop((node_id, engine_id), None)
