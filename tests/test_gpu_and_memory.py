"""GPU inventory (fake specs, NVML through substituted functions) and memory estimates."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sage_mq.errors import ConfigError
from sage_mq.gpu import GIB, FakeGpus, GPUResourceManager, NvmlGpus, parse_fake_gpus
from sage_mq.memory import FAKE_ENGINE_GB, estimate_memory_gb, params_from_name


@pytest.mark.parametrize(
    ("spec", "sizes_gib"),
    [
        ("2x80GiB", [80, 80]),
        ("80GiB,24GiB", [80, 24]),
        ("1x24", [24]),
        (" 2 x 40GiB , 16GiB", [40, 40, 16]),
    ],
)
def test_fake_gpu_specs(spec: str, sizes_gib: list[int]) -> None:
    assert parse_fake_gpus(spec) == [s * GIB for s in sizes_gib]


@pytest.mark.parametrize("spec", ["", "lots", "0x80GiB", "2x80furlongs", "x80GiB", "65x1GiB"])
def test_bad_fake_gpu_specs_say_what_is_expected(spec: str) -> None:
    with pytest.raises(ConfigError, match="fake GPU spec"):
        parse_fake_gpus(spec)


def test_fake_inventory_reports_every_gpu_free() -> None:
    gpus = GPUResourceManager(FakeGpus("2x24GiB")).gpus()
    assert [(g.index, g.memory_free, g.fake) for g in gpus] == [
        (0, 24 * GIB, True),
        (1, 24 * GIB, True),
    ]


def test_detect_prefers_a_fake_spec_and_finds_no_nvml_here(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GPUResourceManager.detect("1x8GiB").count == 1


class FakeNvml:
    """Stands in for the pynvml module of nvidia-ml-py: the same function names and shapes."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes | str:
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else "NVIDIA L4"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        total = (80 if handle == 0 else 24) * GIB
        return SimpleNamespace(total=total, used=GIB, free=total - GIB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        if handle == 1:
            raise self.NVMLError("not supported")
        return [SimpleNamespace(pid=4242, usedGpuMemory=GIB)]


def test_nvml_path_reads_names_memory_and_processes() -> None:
    nvml = FakeNvml()
    gpus = GPUResourceManager(NvmlGpus(nvml)).gpus()  # type: ignore[arg-type]
    assert nvml.initialised
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA L4"]
    assert gpus[0].memory_total == 80 * GIB and gpus[0].memory_free == 79 * GIB
    assert gpus[0].processes[0].pid == 4242
    assert gpus[1].processes == ()  # NVML refusing to list processes is not fatal
    assert not gpus[0].fake


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("Qwen/Qwen2.5-1.5B-Instruct", 1.5),
        ("meta-llama/Llama-3.1-70B", 70.0),
        ("intfloat/e5-small-560M", 0.56),
        ("BAAI/bge-m3", None),
        ("demo", None),
    ],
)
def test_parameter_count_is_read_off_the_model_name(name: str, params: float | None) -> None:
    assert params_from_name(name) == params


def test_memory_estimate_is_weights_plus_kv_cache_plus_overhead() -> None:
    # 1.5e9 params x 2 bytes = 2.79 GiB; KV max(1, 0.70) = 1; overhead 1.5
    assert estimate_memory_gb("Qwen/Qwen2.5-1.5B-Instruct") == pytest.approx(5.29, abs=0.01)
    assert estimate_memory_gb("x-7B", dtype="int4") < estimate_memory_gb("x-7B")
    assert estimate_memory_gb("anything", required_memory_gb=12.5) == 12.5
    assert estimate_memory_gb("huge-70B", backend="fake") == FAKE_ENGINE_GB
    assert estimate_memory_gb("BAAI/bge-m3", kind="embedding") < 3
