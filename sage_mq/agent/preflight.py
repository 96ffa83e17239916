"""Checks an agent makes before it acts: can this engine launch here; is this node id free."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

import psutil

from sage_mq.errors import ConfigError, LaunchError, PortInUse
from sage_mq.gpu import GpuInfo
from sage_mq.messages import LaunchEngine
from sage_mq.store import Store


def check_launch(cmd: LaunchEngine, gpus: Sequence[GpuInfo], node_id: str) -> None:
    """Raise :class:`LaunchError` if ``cmd`` cannot launch here (a GPU it names is missing,
    its address is not this host's), :class:`PortInUse` if another process holds its port."""
    have = {g.index for g in gpus}
    missing = [g for g in cmd.gpus if g not in have]
    if missing:
        raise LaunchError(f"GPU(s) {missing} do not exist on node {node_id} (has {sorted(have)})")
    check_bind(cmd.host, cmd.port, node_id)


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
