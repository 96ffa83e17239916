"""Deployments (docs/contract.md §9): a named engine spec with a replica range and what one
replica should carry; the scheduler keeps its engines, ``<name>-<n>``, within the range.

A deployment is kept in Redis as the hash ``sage:deployment:<name>`` (its range and target as
plain fields, readable with ``redis-cli HGETALL``; the engine spec as JSON) and listed in the set
``sage:deployments``. Its engines are ordinary engines (records, events, healing) whose records
name it (``deployment``); engines started by hand name none and are never touched for it.
"""

from __future__ import annotations

import re
import time

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sage_mq.errors import InvalidRequest
from sage_mq.ids import DeploymentName, check_id
from sage_mq.spec import EngineSpec, WholeNumber

MAX_REPLICAS = 1000


class Autoscale(BaseModel):
    """A deployment's replica range and what one RUNNING replica should carry."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min_replicas: WholeNumber = Field(1, ge=0, le=MAX_REPLICAS)
    """0: scale to zero (a request held while a replica starts)."""
    max_replicas: WholeNumber = Field(1, ge=1, le=MAX_REPLICAS)
    target_in_flight: float = Field(4.0, gt=0, le=1_000_000)
    """Requests in flight per RUNNING replica the deployment aims at."""
    scale_down_after_s: float = Field(300.0, ge=0, le=7 * 24 * 3600)
    """How long the load stays below what the replicas serve before one replica goes."""

    @model_validator(mode="after")
    def _ordered(self) -> Autoscale:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is more than max_replicas "
                f"({self.max_replicas})"
            )
        return self

    @classmethod
    def fixed(cls, replicas: int) -> Autoscale:
        """Exactly ``replicas`` (a preset's ``replicas: N``)."""
        return cls(min_replicas=replicas, max_replicas=max(replicas, 1))


class Deployment(Autoscale):
    """A deployment as stored: its name, the spec of each replica, and its range and target
    (the fields of :class:`Autoscale`, kept flat so redis-cli shows them as they are)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    name: DeploymentName
    spec: EngineSpec
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @classmethod
    def of(cls, name: str, spec: EngineSpec, autoscale: Autoscale) -> Deployment:
        """A new deployment; a name no engine id could be made of is refused, saying why."""
        check_id("deployment name", name)
        if spec.port is not None and autoscale.max_replicas > 1:
            raise InvalidRequest(
                "a deployment of more than one replica cannot ask for a port: each replica "
                "gets its own (leave --port out)"
            )
        return cls(name=name, spec=spec, **autoscale.model_dump())

    @property
    def autoscale(self) -> Autoscale:
        return Autoscale.model_validate(self.model_dump(include=set(Autoscale.model_fields)))

    @property
    def served_name(self) -> str:
        """The model name its replicas answer to, and the gateway routes by."""
        return self.spec.served_model_name or self.spec.model

    def replica_id(self, number: int) -> str:
        """The engine id of replica ``number``."""
        return f"{self.name}-{number}"


def default_name(spec: EngineSpec) -> str:
    """The name ``sage llm deploy MODEL`` gives when none is given: the served model name, or
    the last part of the model's id or path, made into a valid name."""
    base = spec.served_model_name or spec.model.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")[:120]
    return name or "deployment"
