"""Checks an agent makes before it acts: can this engine launch here; is this node id free."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Iterable, Sequence

import psutil

from sage_mq.engines.argv_policy import (
    GATED_FLAGS,
    NodeAllowances,
    check_engine_args,
    node_refusal,
)
from sage_mq.engines.backends import BACKEND_NAMES
from sage_mq.engines.env_policy import check_engine_env
from sage_mq.errors import ConfigError, InvalidRequest, LaunchError, LaunchRefused, PortInUse
from sage_mq.gpu import GpuInfo
from sage_mq.messages import LaunchEngine
from sage_mq.settings import AgentSettings
from sage_mq.store import Store


def check_launch(
    cmd: LaunchEngine, gpus: Sequence[GpuInfo], agent: AgentSettings, allowances: NodeAllowances
) -> None:
    """Raise :class:`LaunchRefused` if this node will not run ``cmd`` as written (see
    :mod:`sage_mq.engines.argv_policy`; its port outside the node's range), :class:`LaunchError`
    if it cannot (a GPU it names is missing, its address is not this host's), and
    :class:`PortInUse` if another process holds its port."""
    node_id = agent.node_id
    if cmd.backend not in BACKEND_NAMES:
        raise LaunchRefused(f"unknown backend {cmd.backend!r}; node {node_id} runs {BACKEND_NAMES}")
    try:
        check_engine_args(cmd.backend, cmd.model, cmd.extra_args)
        check_engine_env(cmd.env)
    except InvalidRequest as exc:
        raise LaunchRefused(str(exc)) from None
    refusal = node_refusal(cmd.backend, cmd.extra_args, allowances)
    if refusal is not None:
        raise LaunchRefused(f"node {node_id}: {refusal}")
    low, high = agent.port_range
    if not low <= cmd.port <= high:
        raise LaunchRefused(
            f"port {cmd.port} is outside node {node_id}'s engine port range {low}-{high}"
        )
    have = {g.index for g in gpus}
    missing = [g for g in cmd.gpus if g not in have]
    if missing:
        raise LaunchError(f"GPU(s) {missing} do not exist on node {node_id} (has {sorted(have)})")
    check_bind(cmd.host, cmd.port, node_id)


def node_allowances(
    agent: AgentSettings, backends: Iterable[str]
) -> tuple[dict[str, str], NodeAllowances]:
    """What this node's operator allowed (``--allow-command``, ``--allow-engine-flag``),
    checked: the paths the allowed executables resolve to, and the allowances (with the
    ``backends`` it has runtimes for)."""
    executables = allowed_executables(agent.allowed_commands)
    flags = check_engine_flags(agent.allowed_engine_flags)
    return executables, NodeAllowances(
        frozenset(executables), frozenset(flags), backends=frozenset(backends)
    )


def allowed_executables(names: Iterable[str]) -> dict[str, str]:
    """What ``--allow-command`` names, resolved now: each name as given, and its absolute path,
    mapped to the absolute path the agent will run (PATH at launch time does not matter)."""
    found: dict[str, str] = {}
    for name in names:
        path = shutil.which(name)
        if path is None:
            raise ConfigError(f"--allow-command {name!r}: no such executable on this host's PATH")
        path = os.path.abspath(path)  # not resolved: a venv's python is a symlink
        found[name] = found[path] = path
    return found


def check_engine_flags(flags: Iterable[str]) -> tuple[str, ...]:
    """``--allow-engine-flag`` values (``trust-remote-code`` or ``--trust-remote-code``; llama.cpp's
    ``lora_path`` as ``lora-path``), each one of the gated flags: a typo would allow nothing and
    say nothing."""
    gated = frozenset().union(*GATED_FLAGS.values())
    checked = []
    for given in flags:
        flag = (given if given.startswith("-") else f"--{given}").replace("_", "-").lower()
        if flag not in gated:
            raise ConfigError(
                f"--allow-engine-flag {given!r}: not a gated flag; only "
                f"{', '.join(sorted(gated))} need an allowance"
            )
        checked.append(flag)
    return tuple(checked)


async def refuse_a_second_agent(store: Store, node_id: str) -> None:
    """Two agents on one node id would both carry out its commands: never start a second."""
    record = await store.get_node(node_id)
    if record is None or record.agent_pid in (None, os.getpid()):
        return
    if not await store.is_alive(node_id):
        return
    here = record.hostname == socket.gethostname()
    if here and not _running(record.agent_pid):
        return  # its predecessor on this host died (kill -9); its key has not expired yet
    raise ConfigError(
        f"node {node_id!r} already has a live agent (pid {record.agent_pid} on "
        f"{record.hostname or 'another host'}); stop it, or choose another --node-id"
    )


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed agent not yet reaped is not a live one)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check_bind(host: str, port: int, node_id: str) -> None:
    """Raise if a server could not bind ``host:port`` right now (:class:`PortInUse` if another
    process holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on {host} is already in use (node {node_id})"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LaunchError(
                    f"address {host} is not on this host, node {node_id} "
                    "(check --advertise-address)"
                ) from None
            raise LaunchError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
