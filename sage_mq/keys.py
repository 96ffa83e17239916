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
    def deployments(self) -> str:
        """Set of all deployment names."""
        return self._k("deployments")

    def deployment(self, name: str) -> str:
        """Hash holding one deployment: its spec, replica range and target."""
        return self._k("deployment", name)

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

    # -- batch (files and batches of the OpenAI Batch API) --------------------------------
    @property
    def files(self) -> str:
        """Sorted set of all file ids, scored by creation time (seconds)."""
        return self._k("files")

    def file(self, file_id: str) -> str:
        """Hash holding one file record (OpenAI's file object fields)."""
        return self._k("file", file_id)

    def file_lines(self, file_id: str) -> str:
        """List of an uploaded file's lines."""
        return self._k("file", file_id, "lines")

    def file_upload(self, file_id: str) -> str:
        """List of the lines of an upload still coming in (renamed to ``file_lines`` once whole;
        expires if its gateway dies first)."""
        return self._k("file", file_id, "upload")

    @property
    def batches(self) -> str:
        """Sorted set of all batch ids, scored by creation time (seconds)."""
        return self._k("batches")

    @property
    def batches_active(self) -> str:
        """Set of the ids of batches not yet in a final state."""
        return self._k("batches", "active")

    def batch(self, batch_id: str) -> str:
        """Hash holding one batch record (OpenAI's batch object fields)."""
        return self._k("batch", batch_id)

    def batch_requests(self, batch_id: str) -> str:
        """List of a batch's checked requests (JSON: line, custom_id, body), in file order."""
        return self._k("batch", batch_id, "requests")

    def batch_results(self, batch_id: str) -> str:
        """Hash custom_id -> output line (JSON) of the requests that succeeded."""
        return self._k("batch", batch_id, "results")

    def batch_errors(self, batch_id: str) -> str:
        """Hash custom_id -> error line (JSON) of the requests that failed."""
        return self._k("batch", batch_id, "errors")

    def batch_done(self, batch_id: str) -> str:
        """List of the custom_ids with an outcome, in the order the outcomes were recorded."""
        return self._k("batch", batch_id, "done")

    def batch_pending(self, batch_id: str) -> str:
        """Set of a batch's chunk numbers not finished yet."""
        return self._k("batch", batch_id, "pending")

    def batch_jobs(self, batch_id: str) -> str:
        """Hash chunk number -> rq job id of its latest run."""
        return self._k("batch", batch_id, "jobs")

    def batch_lease(self, batch_id: str, chunk: int) -> str:
        """String with a short TTL, kept alive by the worker running that chunk."""
        return self._k("batch", batch_id, "lease", str(chunk))

    def queue(self, name: str) -> str:
        """The name of one of our rq queues (``sage:batch``; rq keeps it as
        ``rq:queue:sage:batch``)."""
        return self._k(name)

    @property
    def batch_sweeper(self) -> str:
        """Lock (with TTL) of the worker that looks for stranded chunks right now."""
        return self._k("batch", "sweeper")
