"""GPU inventory: NVML through nvidia-ml-py, a fake inventory for tests and demos, or none."""

from __future__ import annotations

import logging
import re
from types import ModuleType
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from sage_mq.errors import ConfigError

log = logging.getLogger(__name__)
GIB = 1024**3
_UNITS = {"gib": GIB, "gb": 10**9, "mib": 1024**2, "mb": 10**6, "tib": 1024**4}


class GpuProcess(BaseModel):
    """A process holding memory on a GPU."""

    model_config = ConfigDict(frozen=True)
    pid: int
    used_bytes: int | None = None


class GpuInfo(BaseModel):
    """One GPU as the node sees it now."""

    model_config = ConfigDict(frozen=True)
    index: int
    name: str
    uuid: str = ""
    memory_total: int
    memory_used: int = 0
    memory_free: int
    processes: tuple[GpuProcess, ...] = ()
    fake: bool = False

    @property
    def total_gb(self) -> float:
        """Total memory in GiB."""
        return self.memory_total / GIB


class GpuSource(Protocol):
    """Where a node's GPU inventory comes from."""

    def snapshot(self) -> list[GpuInfo]:
        """The GPUs as they are now."""
        ...


class NoGpus:
    """A node without GPUs (or without NVML)."""

    def snapshot(self) -> list[GpuInfo]:
        """Always empty."""
        return []


class FakeGpus:
    """A fixed inventory, e.g. from ``--fake-gpus 2x80GiB`` or ``80GiB,24GiB``."""

    def __init__(self, spec: str) -> None:
        self.sizes = parse_fake_gpus(spec)

    def snapshot(self) -> list[GpuInfo]:
        """Every fake GPU, all memory free."""
        return [
            GpuInfo(
                index=i,
                name=f"Fake GPU {size / GIB:g}GiB",
                uuid=f"GPU-fake-{i}",
                memory_total=size,
                memory_free=size,
                fake=True,
            )
            for i, size in enumerate(self.sizes)
        ]


class NvmlGpus:
    """The real inventory from NVML; ``nvml`` is the ``pynvml`` module of nvidia-ml-py."""

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml
        nvml.nvmlInit()

    def snapshot(self) -> list[GpuInfo]:
        """Name, memory and processes of every GPU NVML reports."""
        nvml = self.nvml
        out = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(
                GpuInfo(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    memory_total=int(mem.total),
                    memory_used=int(mem.used),
                    memory_free=int(mem.free),
                    processes=self._processes(handle),
                )
            )
        return out

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self.nvml.NVMLError as exc:
            log.debug("NVML cannot list processes: %s", exc)
            return ()
        return tuple(GpuProcess(pid=p.pid, used_bytes=p.usedGpuMemory) for p in procs)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class GPUResourceManager:
    """A node's GPUs: NVML where present, a fake inventory when given, otherwise none."""

    def __init__(self, source: GpuSource | None = None) -> None:
        self.source: GpuSource = source or NoGpus()

    @classmethod
    def detect(cls, fake_spec: str | None = None) -> GPUResourceManager:
        """Fake inventory if a spec is given, else NVML if it loads, else no GPUs."""
        if fake_spec:
            return cls(FakeGpus(fake_spec))
        return cls(nvml_source())

    def gpus(self) -> list[GpuInfo]:
        """The GPUs as they are now."""
        return self.source.snapshot()

    @property
    def count(self) -> int:
        """How many GPUs this node has."""
        return len(self.gpus())


def nvml_source() -> GpuSource:
    """NVML if nvidia-ml-py is installed and a driver answers; no GPUs otherwise."""
    try:
        import pynvml
    except ImportError:
        log.info("nvidia-ml-py is not installed (pip install 'sage-mq[gpu]'): no GPUs")
        return NoGpus()
    try:
        return NvmlGpus(pynvml)
    except pynvml.NVMLError as exc:
        log.info("NVML unavailable (%s): no GPUs", exc)
        return NoGpus()


def parse_fake_gpus(spec: str) -> list[int]:
    """``2x80GiB`` → two GPUs of 80 GiB; ``80GiB,24GiB`` → one of each. Sizes in bytes."""
    sizes: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(?:(\d+)\s*[xX]\s*)?(\d+(?:\.\d+)?)\s*([A-Za-z]*)", part)
        if not m:
            raise ConfigError(f"bad fake GPU spec {spec!r}: expected e.g. 2x80GiB or 80GiB,24GiB")
        count, amount, unit = int(m.group(1) or 1), float(m.group(2)), (m.group(3) or "GiB")
        factor = _UNITS.get(unit.lower())
        if factor is None or count < 1 or amount <= 0:
            raise ConfigError(f"bad fake GPU spec {spec!r}: {part!r} (units: GiB, GB, MiB, MB)")
        sizes.extend([int(amount * factor)] * count)
    if len(sizes) > 64:
        raise ConfigError(f"bad fake GPU spec {spec!r}: at most 64 GPUs per node")
    return sizes
