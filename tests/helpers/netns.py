"""Hosts for real multi-host tests: Linux network namespaces, each joined to the root namespace
by a veth pair on a /24 of its own (root side .1, host side .2). Needs root and iproute2."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def why_no_namespaces() -> str | None:
    """None if this machine lets the test make network namespaces, else why not."""
    probe = f"sgprobe{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", probe)
    except FileNotFoundError:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed (needs root / CAP_SYS_ADMIN): {exc.stderr.decode().strip()}"
    ip("netns", "delete", probe)
    return None


@dataclass(frozen=True)
class Host:
    """One namespace: ``address`` inside it, ``gateway`` (the root side) to reach out through."""

    netns: str
    link: str
    address: str
    gateway: str

    def argv(self, *argv: str) -> list[str]:
        """A command line that runs ``argv`` inside this host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def cut(self) -> None:
        """Pull the cable: nothing passes between this host and the rest."""
        ip("link", "set", self.link, "down")

    def heal(self) -> None:
        ip("link", "set", self.link, "up")

    def pids(self) -> list[int]:
        done = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=10
        )
        return [int(p) for p in done.stdout.split()]


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """``count`` hosts, torn down (their processes killed) at the end."""
    tag = uuid.uuid4().hex[:4]
    net = random.randrange(100, 250)
    made: list[Host] = []
    try:
        for i in range(count):
            host = Host(f"sg{tag}h{i}", f"sg{tag}r{i}", f"10.{net}.{i}.2", f"10.{net}.{i}.1")
            inside = f"sg{tag}n{i}"
            ip("netns", "add", host.netns)
            made.append(host)
            ip("link", "add", host.link, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", host.netns)
            ip("addr", "add", f"{host.gateway}/24", "dev", host.link)
            ip("link", "set", host.link, "up")
            inner = ["netns", "exec", host.netns, "ip"]
            ip(*inner, "addr", "add", f"{host.address}/24", "dev", inside)
            ip(*inner, "link", "set", inside, "up")
            ip(*inner, "link", "set", "lo", "up")
            ip(*inner, "route", "add", "default", "via", host.gateway)
        yield made
    finally:
        for host in made:
            for pid in host.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("link", "delete", host.link)
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "delete", host.netns)


def listening(pid: int) -> list[str]:
    """The addresses a process listens on (TCP/IPv4), seen from its own namespace (psutil
    reads the caller's)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    with open(f"/proc/{pid}/net/tcp") as table:
        for row in list(table)[1:]:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address = bytes.fromhex(local.split(":")[0])[::-1]
                found.append(".".join(str(octet) for octet in address))
    return found
