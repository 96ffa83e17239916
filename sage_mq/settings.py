"""Settings, read once at the edge (CLI or ``create()``) and passed down.

This is the only module that reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sage_mq.errors import ConfigError
from sage_mq.keys import DEFAULT_NAMESPACE
from sage_mq.redis_urls import is_sentinel_url, url_secrets

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
ENV_REDIS_URL = "SAGE_MQ_REDIS_URL"
ENV_NAMESPACE = "SAGE_MQ_NAMESPACE"
ENV_REPLICA_ACKS = "SAGE_MQ_REPLICA_ACKS"
ENV_FAKE_GPUS = "SAGE_MQ_FAKE_GPUS"
ENV_STATE_DIR = "SAGE_MQ_STATE_DIR"
ENV_RUNTIME_PREFIX = "SAGE_MQ_RUNTIME_"
ENV_CONTROL_PLANE_URL = "SAGE_CONTROL_PLANE_URL"
DEFAULT_CONTROL_PLANE_URL = "http://localhost:8000/v1"
ENV_API_KEY = "SAGE_MQ_API_KEY"
ENV_ADMIN_KEY = "SAGE_MQ_ADMIN_KEY"
ENV_SECRET_ENV = "SAGE_MQ_SECRET_ENV"
"""More variable names (comma-separated) that engines must never see."""
_OUR_PREFIXES = ("SAGE_MQ_", "SAGE_CONTROL_PLANE_URL")
_SECRET_MIN_CHARS = 4
"""Shorter "secrets" would hide innocent variables that happen to contain them."""
ENV_GATEWAY_POLICY = "SAGE_MQ_GATEWAY_POLICY"
"""How ``gateway run --workers N`` hands its scheduling policy to its worker processes."""
ENV_GATEWAY_MAX_BODY = "SAGE_MQ_GATEWAY_MAX_BODY"


@dataclass(frozen=True)
class GatewayOptions:
    """What a gateway process needs beyond :class:`Settings`."""

    policy: str = "adaptive"
    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    """A request body's limit (uploads have their own: the largest batch file)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayOptions:
        """From ``SAGE_MQ_GATEWAY_POLICY``, ``SAGE_MQ_API_KEY``, ``SAGE_MQ_ADMIN_KEY`` and
        ``SAGE_MQ_GATEWAY_MAX_BODY``."""
        env = os.environ if env is None else env
        body = env.get(ENV_GATEWAY_MAX_BODY, "")
        return cls(
            policy=env.get(ENV_GATEWAY_POLICY) or "adaptive",
            api_key=env.get(ENV_API_KEY) or None,
            admin_key=env.get(ENV_ADMIN_KEY) or None,
            max_body_bytes=int(body) if body.isdigit() else cls.max_body_bytes,
        )

    def as_env(self) -> dict[str, str]:
        """The variables :meth:`from_env` reads (for worker processes to inherit)."""
        env = {ENV_GATEWAY_POLICY: self.policy, ENV_GATEWAY_MAX_BODY: str(self.max_body_bytes)}
        if self.api_key:
            env[ENV_API_KEY] = self.api_key
        if self.admin_key:
            env[ENV_ADMIN_KEY] = self.admin_key
        return env


def control_plane_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """Where the client finds the fleet unless told: env ``SAGE_CONTROL_PLANE_URL``."""
    return (env if env is not None else os.environ).get(ENV_CONTROL_PLANE_URL) or (
        DEFAULT_CONTROL_PLANE_URL
    )


@dataclass(frozen=True)
class BusSettings:
    """How stream consumers read, retry, claim and dead-letter."""

    block_ms: int = 1000
    """XREADGROUP BLOCK; must stay below the Redis client's socket timeout."""
    batch_size: int = 64
    claim_min_idle_ms: int = 10_000
    """Entries pending this long (a dead consumer's, or a failed handler's) are re-claimed."""
    max_deliveries: int = 5
    stream_maxlen: int = 100_000
    dead_maxlen: int = 10_000
    idempotency_ttl_s: int = 24 * 3600


@dataclass(frozen=True)
class AgentSettings:
    """One node agent's identity, timings and local directories."""

    node_id: str
    advertise_address: str = "127.0.0.1"
    port_range: tuple[int, int] = (40000, 40999)
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    liveness_ttl_s: float = 5.0
    stop_grace_s: float = 10.0
    log_max_bytes: int = 20 * 1024 * 1024
    log_backups: int = 3
    log_stream_maxlen: int = 2000
    readiness_poll_s: float = 0.1
    allowed_commands: tuple[str, ...] = ()
    """Executables the ``command`` backend may run here (``--allow-command``); none: it is off."""
    allowed_engine_flags: tuple[str, ...] = ()
    """Gated engine flags requests may use here (``--allow-engine-flag``), e.g. vLLM's
    ``--trust-remote-code``."""
    runtimes: Mapping[str, str] = field(default_factory=dict)
    """The interpreter each backend runs in here (``--runtime vllm=PYTHON``); a backend not
    named runs in the agent's own if its modules are there."""

    @property
    def node_dir(self) -> Path:
        """Directory for this node's engine state files and logs."""
        return self.state_dir / self.node_id


@dataclass(frozen=True)
class RestartPolicy:
    """How the scheduler heals engines (contract defaults; all configurable)."""

    auto_restart: bool = True
    max_restart_attempts: int = 3
    failure_threshold: int = 3
    """Consecutive failed probes that make a RUNNING engine unhealthy and restarted."""
    backoff_base_s: float = 1.0
    stability_window_s: float = 60.0
    """RUNNING this long since its last (re)start resets an engine's attempt counter."""


@dataclass(frozen=True)
class SchedulerSettings:
    """How often the scheduler probes, and how it heals."""

    health_interval_s: float = 2.0
    probe_timeout_s: float = 1.0
    """One probe's timeout: ample for a health endpoint, and short, as a hang costs all of it."""
    lease_ttl_s: float = 5.0
    """A leader that cannot renew its lease for this long is replaced by a standby."""
    node_lost_grace_s: float = 60.0
    """After a node is lost, wait this long before placing its engines elsewhere: an agent
    restarted, upgraded or cut off from Redis for less takes nothing down (its engines keep
    serving meanwhile), while moving a model that loads for minutes costs minutes."""
    hung_grace_s: float = 1.0
    """A hung engine's SIGTERM-to-SIGKILL grace: it answers nothing, so it will finish
    nothing either, and it holds its GPUs until it is gone."""
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    timer_poll_s: float = 0.05


@dataclass(frozen=True)
class Settings:
    """Connection and namespace shared by every actor."""

    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = DEFAULT_NAMESPACE
    bus: BusSettings = field(default_factory=BusSettings)
    socket_timeout_s: float = 5.0
    replica_acks: int | None = None
    """Replicas a durable write waits for (``WAIT``, see :mod:`sage_mq.replication`); None:
    one under Sentinel, none otherwise. Env ``SAGE_MQ_REPLICA_ACKS``."""
    replica_ack_timeout_ms: int = 1000

    @property
    def replicas_to_wait_for(self) -> int:
        if self.replica_acks is not None:
            return self.replica_acks
        return 1 if is_sentinel_url(self.redis_url) else 0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, redis_url: str | None = None
    ) -> Settings:
        """Settings from the environment, with explicit arguments taking precedence."""
        env = os.environ if env is None else env
        acks = env.get(ENV_REPLICA_ACKS, "").strip()
        if acks and not acks.isdigit():
            raise ConfigError(f"{ENV_REPLICA_ACKS} must be a number of replicas (0: do not wait)")
        return cls(
            redis_url=redis_url or env.get(ENV_REDIS_URL) or DEFAULT_REDIS_URL,
            namespace=env.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE,
            replica_acks=int(acks) if acks else None,
        )


def runtimes_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """``--runtime`` values from ``SAGE_MQ_RUNTIME_<BACKEND>=PYTHON`` variables."""
    env = os.environ if env is None else env
    return [
        f"{name[len(ENV_RUNTIME_PREFIX) :].lower()}={value}"
        for name, value in sorted(env.items())
        if name.startswith(ENV_RUNTIME_PREFIX) and value
    ]


def fake_gpus_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The fake GPU inventory spec from ``SAGE_MQ_FAKE_GPUS``, if set."""
    env = os.environ if env is None else env
    return env.get(ENV_FAKE_GPUS) or None


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where agents keep engine state files and logs (``SAGE_MQ_STATE_DIR`` overrides)."""
    env = os.environ if env is None else env
    if env.get(ENV_STATE_DIR):
        return Path(env[ENV_STATE_DIR])
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sage-mq"


def engine_base_env(
    env: Mapping[str, str] | None = None, *, secrets: Iterable[str | None] = ()
) -> dict[str, str]:
    """The environment engine processes inherit: the agent's own, less sage-mq's settings
    (``SAGE_MQ_*``: the Redis URL, the gateway keys), the variables ``SAGE_MQ_SECRET_ENV``
    names (comma-separated), and any variable whose value holds one of ``secrets`` (a Redis
    password, a gateway key, under whatever name it was copied). An engine runs model code and
    prints its environment in its log: nothing it is given may open the fleet. (The values of
    ``SAGE_MQ_API_KEY``, ``SAGE_MQ_ADMIN_KEY`` and the password in ``SAGE_MQ_REDIS_URL`` are
    always among the secrets.)"""
    env = os.environ if env is None else env
    named = {n.strip() for n in env.get(ENV_SECRET_ENV, "").split(",") if n.strip()}
    ours = [env.get(ENV_API_KEY), env.get(ENV_ADMIN_KEY), *url_secrets(env.get(ENV_REDIS_URL, ""))]
    hidden = [s for s in (*secrets, *ours) if s and len(s) >= _SECRET_MIN_CHARS]
    return {
        name: value
        for name, value in env.items()
        if not name.startswith(_OUR_PREFIXES)
        and name not in named
        and not any(secret in value for secret in hidden)
    }
