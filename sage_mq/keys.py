"""Every Redis key and stream name of sage-mq, spelled in exactly one place."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "sage"


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace prefix (``sage`` by default)."""

    namespace: str = DEFAULT_NAMESPACE

    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # -- streams (contract) --------------------------------------------------------------
    @property
    def requests(self) -> str:
        """Stream of management requests to the scheduler."""
        return self._k("requests")

    @property
    def events(self) -> str:
        """Stream of every event from agents and the scheduler."""
        return self._k("events")

    @property
    def dead(self) -> str:
        """Dead-letter stream."""
        return self._k("dead")

    def node_commands(self, node_id: str) -> str:
        """Command stream of one node agent."""
        return self._k("node", node_id, "commands")

    # -- records (contract) --------------------------------------------------------------
    @property
    def engines(self) -> str:
        """Set of all engine ids."""
        return self._k("engines")

    def engine(self, engine_id: str) -> str:
        """Hash holding one engine record."""
        return self._k("engine", engine_id)

    @property
    def nodes(self) -> str:
        """Set of all node ids."""
        return self._k("nodes")

    def node(self, node_id: str) -> str:
        """Hash holding one node record."""
        return self._k("node", node_id)

    def node_alive(self, node_id: str) -> str:
        """String with a TTL, present while the node's agent is alive."""
        return self._k("node", node_id, "alive")

    # -- ours ----------------------------------------------------------------------------
    def node_ports(self, node_id: str) -> str:
        """Hash port -> engine id of the ports the scheduler assigned on a node."""
        return self._k("node", node_id, "ports")

    def node_reservations(self, node_id: str) -> str:
        """Hash engine id -> JSON ``{gpus, memory_gb}`` of GPU reservations on a node."""
        return self._k("node", node_id, "reservations")

    def engine_log(self, engine_id: str) -> str:
        """Capped stream of an engine's log lines, shipped by its agent."""
        return self._k("engine", engine_id, "log")

    @property
    def scheduler_leader(self) -> str:
        """String with a TTL: ``<name>:<epoch>`` of the scheduler that leads now."""
        return self._k("scheduler", "leader")

    @property
    def scheduler_epoch(self) -> str:
        """Counter: each new leadership term takes the next epoch."""
        return self._k("scheduler", "epoch")

    @property
    def timers(self) -> str:
        """Sorted set of durable timers (score: when due), e.g. restarts waiting out backoff."""
        return self._k("timers")

    def processed(self, group: str, message_id: str) -> str:
        """Idempotency marker: a message id already carried out by a consumer group."""
        return self._k("done", group, message_id)
