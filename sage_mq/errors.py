"""The one error hierarchy of sage-mq.

::

    SageMQError                      base of everything we raise on purpose
    ├── ConfigError                  bad settings, URL or fake-GPU spec (fix the input)
    ├── InvalidRequest               a request that can never succeed as written (4xx)
    │   └── EngineNotFound           no engine with that id
    ├── DecodeError                  a stream entry or record that is not ours / not valid
    ├── RequestRejectedError         the scheduler refused a request (reason inside)
    ├── EngineFailedError            an engine ended FAILED while someone waited for it
    ├── PlacementError               no node/GPU/port fits (pure policy result)
    ├── LaunchError                  the agent could not start an engine process
    │   ├── PortInUse                another process holds the engine's port
    │   └── LaunchRefused            the node will not run it as written (not allowed there)
    ├── WaitTimeout                  an outcome did not arrive in time
    └── ControlPlaneUnavailable      Redis cannot be reached (retryable)

Errors that cross the wire are ``{type, message, retryable}`` (see :meth:`SageMQError.to_wire`).
"""

from __future__ import annotations

from typing import Any


class SageMQError(Exception):
    """Base of every error sage-mq raises on purpose."""

    retryable: bool = False

    def to_wire(self) -> dict[str, Any]:
        """The JSON shape of this error when it crosses a process boundary."""
        return {"type": type(self).__name__, "message": str(self), "retryable": self.retryable}


class ConfigError(SageMQError):
    """Settings, a URL or a spec given by the operator cannot be used."""


class InvalidRequest(SageMQError):
    """A request that can never succeed as written."""


class EngineNotFound(InvalidRequest):
    """No engine with the given id exists."""


class DecodeError(SageMQError):
    """A stream entry or stored record could not be decoded into our models."""


class RequestRejectedError(SageMQError):
    """The scheduler refused a request; the message is its reason."""


class EngineFailedError(SageMQError):
    """An engine ended FAILED (or was stopped) while a caller waited for it to run."""


class PlacementError(SageMQError):
    """No live node, GPU set or port satisfies a start request."""


class LaunchError(SageMQError):
    """An engine process could not be started on this node."""


class PortInUse(LaunchError):
    """The engine's port is held by a process that is not ours: another port will do."""


class LaunchRefused(LaunchError):
    """The node will not run this launch as written (an executable or flag its operator did
    not allow, a port outside its range, arguments no process can take): retrying cannot help."""


class WaitTimeout(SageMQError):
    """An awaited outcome did not arrive within the timeout."""

    retryable = True


class ControlPlaneUnavailable(SageMQError):
    """Redis (and so the control plane) cannot be reached right now."""

    retryable = True


class PresetApplyError(SageMQError):
    """An engine of a preset could not be started; what the apply had started was stopped."""


class ModelNotFound(InvalidRequest):
    """No engine serves that model; the message lists the models that are served."""


class InferenceError(SageMQError):
    """An engine or the gateway answered an inference request with an error."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
