"""Engine and node records in Redis hashes (docs/contract.md §2), readable with
``redis-cli HGETALL`` (the field encoding is in :mod:`sage_mq.hashes`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from sage_mq.connection import Redis, redis_errors
from sage_mq.deployments import Deployment
from sage_mq.hashes import from_hash, to_hash
from sage_mq.keys import Keys
from sage_mq.records import EngineRecord, EngineState, NodeRecord, Reservation
from sage_mq.replication import durable_pipeline, durable_write

__all__ = ["EngineRecord", "EngineState", "NodeRecord", "Reservation", "Store", "oldest_first"]


_EACH = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. id .. ARGV[2]
  out[#out + 1] = id
  if #ARGV == 2 then
    out[#out + 1] = redis.call('GET', key) or ''
  else
    for _, got in ipairs(redis.call('HMGET', key, unpack(ARGV, 3))) do
      out[#out + 1] = got or ''
    end
  end
end
return out
"""
"""For every member of a set, the value of ``<prefix><id><suffix>`` (GET), or the fields given
(HMGET): one short round trip however large the fleet. The keys are named in the script, not
in KEYS: fine on one Redis, which is what sage-mq runs on (not Cluster)."""


def oldest_first(records: Iterable[EngineRecord]) -> list[EngineRecord]:
    """Engine records in the order they were asked for."""
    return sorted(records, key=lambda r: (r.created_at, r.engine_id))


_ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
"""A record and its set membership, only if no record of that id exists (one round trip)."""


class Store:
    """Reads and writes records; the only module that knows their hash layout."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis: Any = redis  # RESP2 with str replies; see connection.connect
        self.keys = keys
        self._add = redis.register_script(_ADD)

    async def _batch(self, what: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        """Many reads in one round trip: ``(command, *args)`` each, replies in order."""
        with redis_errors(what):
            async with self.redis.pipeline(transaction=False) as pipe:
                for command, *args in calls:
                    getattr(pipe, command)(*args)
                return list(await pipe.execute())

    # -- engines -------------------------------------------------------------------------
    async def put_engine(self, record: EngineRecord) -> None:
        """Write a whole engine record and add it to the engine set."""
        async with durable_pipeline(self.redis, transaction=True) as pipe:
            pipe.hset(self.keys.engine(record.engine_id), mapping=to_hash(record))
            pipe.sadd(self.keys.engines, record.engine_id)
            with redis_errors("saving an engine record"):
                await pipe.execute()

    async def add_engine(self, record: EngineRecord) -> bool:
        """Write a new engine record unless one with its id exists; whether it was written."""
        flat = [item for pair in to_hash(record).items() for item in pair]
        keys, args = (
            [self.keys.engine(record.engine_id), self.keys.engines],
            [record.engine_id, *flat],
        )
        with redis_errors("recording a new engine"):
            added = await durable_write(
                self.redis, lambda client: self._add(keys=keys, args=args, client=client)
            )
        return bool(added)

    async def update_engine(
        self, engine_id: str, *, current: EngineRecord | None = None, **changes: Any
    ) -> EngineRecord | None:
        """Change some fields of an existing record (``updated_at`` too); None if none exists.

        Only the changed fields are written. ``current``, the record as the caller just read
        it, saves reading it again.
        """
        current = current or await self.get_engine(engine_id)
        if current is None:
            return None
        updated, fields = _changed(current, changes)
        key = self.keys.engine(engine_id)
        with redis_errors("updating an engine record"):
            await durable_write(self.redis, lambda client: client.hset(key, mapping=fields))
        return updated

    def queue_engine_update(
        self, pipe: Any, current: EngineRecord, *, new: bool = False, **changes: Any
    ) -> EngineRecord:
        """:meth:`update_engine` of a record just read, queued on ``pipe`` to be sent with other
        writes; the record as it will be. ``new``: ``current`` is not in Redis yet, so the
        whole record is written (and added to the engine set), as :meth:`put_engine` does."""
        updated, fields = _changed(current, changes)
        if new:
            pipe.hset(self.keys.engine(current.engine_id), mapping=to_hash(updated))
            pipe.sadd(self.keys.engines, current.engine_id)
        else:
            pipe.hset(self.keys.engine(current.engine_id), mapping=fields)
        return updated

    async def get_engine(self, engine_id: str) -> EngineRecord | None:
        """The engine record, or None."""
        with redis_errors("reading an engine record"):
            fields = await self.redis.hgetall(self.keys.engine(engine_id))
        return from_hash(EngineRecord, fields) if fields else None

    async def get_engines(self, engine_ids: list[str]) -> dict[str, EngineRecord]:
        """The records of these engines (those that exist), in one round trip."""
        calls = [("hgetall", self.keys.engine(e)) for e in engine_ids]
        rows = await self._batch("reading engine records", calls)
        return {
            engine_id: from_hash(EngineRecord, row)
            for engine_id, row in zip(engine_ids, rows, strict=True)
            if row
        }

    async def probe_states(self, engine_ids: list[str]) -> dict[str, tuple[str, str, int]]:
        """Engine id -> (node, state, probe_failures) of these engines, in one round trip.

        What a probe report needs to be judged; most reports change nothing, and reading three
        fields costs far less than decoding whole records.
        """
        wanted = ["node", "state", "probe_failures"]
        calls = [("hmget", self.keys.engine(e), wanted) for e in engine_ids]
        rows = await self._batch("reading engine states", calls)
        return {
            engine_id: (node or "", state, int(failures or 0))
            for engine_id, (node, state, failures) in zip(engine_ids, rows, strict=True)
            if state is not None
        }

    async def engine_placements(self) -> dict[str, tuple[str, str | None]]:
        """Engine id -> (state, node) of every engine: what scans need, without whole records."""
        with redis_errors("listing engines"):
            ids = sorted(await self.redis.smembers(self.keys.engines))
        calls = [("hmget", self.keys.engine(e), ["state", "node"]) for e in ids]
        rows = await self._batch("listing engines", calls)
        return {
            engine_id: (state, node or None)
            for engine_id, (state, node) in zip(ids, rows, strict=True)
            if state is not None
        }

    async def list_engines(self) -> list[EngineRecord]:
        """Every engine record, oldest first."""
        with redis_errors("listing engines"):
            ids = sorted(await self.redis.smembers(self.keys.engines))
        return oldest_first((await self.get_engines(ids)).values())

    # -- deployments ---------------------------------------------------------------------
    async def put_deployment(self, deployment: Deployment) -> None:
        """Write a whole deployment (created or changed) and add it to the deployment set."""
        async with durable_pipeline(self.redis, transaction=True) as pipe:
            key = self.keys.deployment(deployment.name)
            pipe.delete(key)  # no field of an older version is left behind
            pipe.hset(key, mapping=to_hash(deployment))
            pipe.sadd(self.keys.deployments, deployment.name)
            with redis_errors("saving a deployment"):
                await pipe.execute()

    async def get_deployment(self, name: str) -> Deployment | None:
        """The deployment, or None."""
        with redis_errors("reading a deployment"):
            fields = await self.redis.hgetall(self.keys.deployment(name))
        return from_hash(Deployment, fields) if fields else None

    async def list_deployments(self) -> list[Deployment]:
        """Every deployment, by name."""
        with redis_errors("listing deployments"):
            names = sorted(await self.redis.smembers(self.keys.deployments))
        rows = await self._batch(
            "reading deployments", [("hgetall", self.keys.deployment(n)) for n in names]
        )
        return [from_hash(Deployment, row) for row in rows if row]

    async def delete_deployment(self, name: str) -> bool:
        """Forget a deployment (its engines are stopped by whoever asked); whether it existed."""
        async with durable_pipeline(self.redis, transaction=True) as pipe:
            pipe.delete(self.keys.deployment(name))
            pipe.srem(self.keys.deployments, name)
            with redis_errors("deleting a deployment"):
                deleted, _removed = await pipe.execute()
        return bool(deleted)

    async def engine_states(self) -> list[tuple[str, str, int]]:
        """(engine id, state, restarts) of every engine, in one short round trip however many
        there are (what ``/metrics`` needs, without decoding 10,000 records)."""
        where = self.keys.engine("\n").split("\n")
        with redis_errors("reading engine states"):
            flat = await self.redis.eval(_EACH, 1, self.keys.engines, *where, "state", "restarts")
        return [
            (engine_id, state, int(restarts) if restarts.isdigit() else 0)  # '' when gone
            for engine_id, state, restarts in zip(flat[::3], flat[1::3], flat[2::3], strict=True)
        ]

    # -- nodes ---------------------------------------------------------------------------
    async def put_node(self, record: NodeRecord, ttl_s: float) -> None:
        """Register a node: its record, its membership and a fresh liveness key."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.node(record.node_id), mapping=to_hash(record))
            pipe.sadd(self.keys.nodes, record.node_id)
            pipe.set(self.keys.node_alive(record.node_id), str(record.epoch), px=int(ttl_s * 1000))
            with redis_errors("registering a node"):
                await pipe.execute()

    async def touch_node(self, node_id: str, epoch: int, ttl_s: float) -> None:
        """Refresh a node's liveness key and last-seen time."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.node_alive(node_id), str(epoch), px=int(ttl_s * 1000))
            pipe.hset(self.keys.node(node_id), "last_seen", json.dumps(time.time()))
            with redis_errors("refreshing node liveness"):
                await pipe.execute()

    async def set_node_status(self, node_id: str, status: str) -> None:
        """Mark a node ``up`` or ``lost`` (the scheduler's view; the agent writes ``up``)."""
        with redis_errors("marking a node"):
            await self.redis.hset(self.keys.node(node_id), "status", status)

    async def next_epoch(self, node_id: str) -> int:
        """A new, larger agent epoch for a node (each agent start gets one)."""
        with redis_errors("taking an agent epoch"):
            return int(await self.redis.hincrby(self.keys.node(node_id), "epoch", 1))

    async def leader_epoch(self) -> int | None:
        """The newest scheduler leader epoch (None: no leader since Redis started empty)."""
        with redis_errors("reading the leader epoch"):
            value = await self.redis.get(self.keys.scheduler_epoch)
        return None if value is None else int(value)

    async def is_alive(self, node_id: str) -> bool:
        """Whether the node's liveness key exists now."""
        with redis_errors("reading node liveness"):
            return bool(await self.redis.exists(self.keys.node_alive(node_id)))

    async def get_node(self, node_id: str) -> NodeRecord | None:
        """The node record, or None."""
        with redis_errors("reading a node record"):
            fields = await self.redis.hgetall(self.keys.node(node_id))
        return from_hash(NodeRecord, fields) if fields.get("address") else None

    async def get_nodes(self, node_ids: list[str]) -> dict[str, NodeRecord]:
        """The records of these nodes (those that exist), in one round trip."""
        rows = await self._batch(
            "reading node records", [("hgetall", self.keys.node(n)) for n in node_ids]
        )
        return {
            node_id: from_hash(NodeRecord, fields)
            for node_id, fields in zip(node_ids, rows, strict=True)
            if fields.get("address")
        }

    async def node_epochs(self) -> dict[str, int | None]:
        """Node id -> the agent epoch in its liveness key (-1 if unreadable), None where the key
        has expired. One short command however large the fleet (the scheduler asks every tick).
        """
        prefix, suffix = self.keys.node_alive("\n").split("\n")
        with redis_errors("reading node liveness"):
            flat = await self.redis.eval(_EACH, 1, self.keys.nodes, prefix, suffix)
        return {
            node_id: None if value == "" else int(value) if value.isdigit() else -1
            for node_id, value in zip(flat[::2], flat[1::2], strict=True)
        }

    async def list_nodes(self) -> list[tuple[NodeRecord, bool]]:
        """Every node record with whether its agent is alive now."""
        with redis_errors("listing nodes"):
            ids = sorted(await self.redis.smembers(self.keys.nodes))
        calls = [("hgetall", self.keys.node(n)) for n in ids]
        calls += [("exists", self.keys.node_alive(n)) for n in ids]
        rows = await self._batch("listing nodes", calls)
        records, alive = rows[: len(ids)], rows[len(ids) :]
        return [
            (from_hash(NodeRecord, fields), bool(live))
            for fields, live in zip(records, alive, strict=True)
            if fields.get("address")
        ]

    # -- ports and GPU reservations (written by the scheduler only) ----------------------
    async def assign_port(self, node_id: str, port: int, engine_id: str) -> bool:
        """Take a port on a node for an engine; False if another engine holds it."""
        key = self.keys.node_ports(node_id)
        with redis_errors("assigning a port"):
            if await self.redis.hsetnx(key, str(port), engine_id):
                return True
            return bool(await self.redis.hget(key, str(port)) == engine_id)

    async def release_port(self, node_id: str, port: int, engine_id: str) -> None:
        """Give a port back, if this engine holds it."""
        key = self.keys.node_ports(node_id)
        with redis_errors("releasing a port"):
            if await self.redis.hget(key, str(port)) == engine_id:
                await self.redis.hdel(key, str(port))

    async def ports_in_use(self, node_id: str) -> dict[int, str]:
        """Port -> engine id of every port assigned on a node."""
        with redis_errors("reading ports"):
            rows = await self.redis.hgetall(self.keys.node_ports(node_id))
        return {int(port): engine_id for port, engine_id in rows.items()}

    async def reserve_gpus(self, node_id: str, engine_id: str, reservation: Reservation) -> None:
        """Record an engine's GPU reservation on a node."""
        with redis_errors("reserving GPUs"):
            await self.queue_reservation(self.redis, node_id, engine_id, reservation)

    def queue_reservation(
        self, pipe: Any, node_id: str, engine_id: str, reservation: Reservation
    ) -> Any:
        """:meth:`reserve_gpus` queued on ``pipe`` (or sent, on a client)."""
        key = self.keys.node_reservations(node_id)
        return pipe.hset(key, engine_id, reservation.model_dump_json())

    async def release_gpus(self, node_id: str, engine_id: str) -> None:
        """Drop an engine's GPU reservation on a node."""
        with redis_errors("releasing GPUs"):
            await self.redis.hdel(self.keys.node_reservations(node_id), engine_id)

    async def node_usage(
        self, node_ids: list[str]
    ) -> dict[str, tuple[dict[str, Reservation], dict[int, str]]]:
        """Reservations and assigned ports of many nodes, in one round trip."""
        calls = [("hgetall", self.keys.node_reservations(n)) for n in node_ids]
        calls += [("hgetall", self.keys.node_ports(n)) for n in node_ids]
        rows = await self._batch("reading node usage", calls)
        usage = {}
        half = len(node_ids)
        for node_id, held, ports in zip(node_ids, rows[:half], rows[half:], strict=True):
            reservations = {e: Reservation.model_validate_json(raw) for e, raw in held.items()}
            usage[node_id] = (reservations, {int(p): e for p, e in ports.items()})
        return usage

    async def reservations(self, node_id: str) -> dict[str, Reservation]:
        """Engine id -> reservation, for one node."""
        with redis_errors("reading GPU reservations"):
            rows = await self.redis.hgetall(self.keys.node_reservations(node_id))
        return {eid: Reservation.model_validate_json(raw) for eid, raw in rows.items()}


def _changed(current: EngineRecord, changes: dict[str, Any]) -> tuple[EngineRecord, dict[str, str]]:
    """The record with ``changes`` (and a new ``updated_at``), and the fields to write: a bad
    value raises here, before anything is written."""
    updated = EngineRecord.model_validate({**dict(current), **changes, "updated_at": time.time()})
    return updated, to_hash(updated, only={*changes, "updated_at"})
