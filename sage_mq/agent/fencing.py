"""Leader fencing on the agent: a command from an older leader than one already heard is ignored."""

from __future__ import annotations

import logging

from sage_mq.store import Store

log = logging.getLogger(__name__)


class LeaderFence:
    """The newest leader epoch this agent has seen, and whether a command's epoch passes.

    Epochs come from a counter in Redis. If Redis comes back empty, the counter starts again at
    1, and the new leader's epoch is below what the agent saw: the agent reads the counter, and
    one below its own figure means Redis lost the history, so fencing starts again from it.
    """

    def __init__(self, store: Store, node_id: str) -> None:
        self.store = store
        self.node_id = node_id
        self.seen = 0

    async def admits(self, epoch: int, what: str) -> bool:
        """Whether to carry out a command sent at ``epoch`` (0: unfenced, always)."""
        if epoch and epoch < self.seen:
            counter = await self.store.leader_epoch()
            if counter is not None and counter < self.seen:
                log.warning(
                    "node %s: the leader epoch counter is at %d, below the %d seen: Redis lost "
                    "its history; fencing starts again from %d",
                    self.node_id,
                    counter,
                    self.seen,
                    counter,
                )
                self.seen = counter
            if epoch < self.seen:
                log.warning(
                    "node %s ignores %s from a stale leader (epoch %d < %d)",
                    self.node_id,
                    what,
                    epoch,
                    self.seen,
                )
                return False
        self.seen = max(self.seen, epoch)
        return True
