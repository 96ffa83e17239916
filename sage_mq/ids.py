"""The shapes of the ids that end up in Redis keys, URLs and file names, checked where they enter.

An engine id names a key (``sage:engine:<id>``), a log file and a state file on a node; a node id
names keys and the node's state directory; file and batch ids name keys. None may hold ``:``
(another key's suffix), ``/`` or a leading ``.`` (a path outside its directory), or anything a
shell or a terminal would read differently.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

from sage_mq.errors import InvalidRequest

ENGINE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
FILE_ID_PATTERN = r"^file-[A-Za-z0-9_-]{1,120}$"
BATCH_ID_PATTERN = r"^batch_[A-Za-z0-9_-]{1,120}$"
DEPLOYMENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$"
"""Short enough that its engines' ids, ``<name>-<n>``, are valid engine ids."""

EngineId = Annotated[str, StringConstraints(pattern=ENGINE_ID_PATTERN)]
NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN)]
DeploymentName = Annotated[str, StringConstraints(pattern=DEPLOYMENT_NAME_PATTERN)]

_SHAPES = {
    "engine id": (re.compile(ENGINE_ID_PATTERN), "letters, digits, '.', '_' and '-', 200 at most"),
    "node id": (re.compile(NODE_ID_PATTERN), "letters, digits, '.', '_' and '-', 128 at most"),
    "deployment name": (
        re.compile(DEPLOYMENT_NAME_PATTERN),
        "letters, digits, '.', '_' and '-', 120 at most",
    ),
}


def check_id(kind: str, value: str) -> str:
    """``value`` if it is a well-formed id of ``kind`` ("engine id", "node id",
    "deployment name"), else
    :class:`InvalidRequest` saying what one looks like."""
    pattern, shape = _SHAPES[kind]
    if not pattern.fullmatch(value):
        raise InvalidRequest(
            f"{value[:80]!r} is not a valid {kind}: it starts with a letter or digit, then {shape}"
        )
    return value
