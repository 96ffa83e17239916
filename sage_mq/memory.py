"""Pure memory estimates for placing an engine on GPUs."""

from __future__ import annotations

import re

DTYPE_BYTES = {
    "float32": 4.0,
    "float16": 2.0,
    "bfloat16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    "awq": 0.5,
    "gptq": 0.5,
}
DEFAULT_PARAMS_B = 7.0
"""Assumed size, in billions of parameters, of a model whose name tells none."""
FAKE_ENGINE_GB = 0.5
_PARAMS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])")


def params_from_name(model: str) -> float | None:
    """Billions of parameters read off a model name (``Qwen2.5-1.5B`` → 1.5), if it says."""
    found = _PARAMS.findall(model.replace("_", "-"))
    if not found:
        return None
    number, unit = found[-1]
    return float(number) / (1000.0 if unit in "mM" else 1.0)


def estimate_memory_gb(
    model: str,
    *,
    kind: str = "llm",
    backend: str = "vllm",
    dtype: str = "bfloat16",
    params_b: float | None = None,
    required_memory_gb: float | None = None,
) -> float:
    """GiB an engine needs in total, across all its GPUs.

    Weights (parameters times dtype bytes) plus KV cache (a quarter of the weights, at least 1 GiB,
    for LLMs) plus runtime overhead (CUDA context, activations). ``required_memory_gb`` wins.
    """
    if required_memory_gb is not None:
        return float(required_memory_gb)
    if backend == "fake":
        return FAKE_ENGINE_GB
    params = params_b if params_b is not None else params_from_name(model)
    if params is None:
        params = 0.4 if kind == "embedding" else DEFAULT_PARAMS_B
    weights = params * 1e9 * DTYPE_BYTES.get(dtype, 2.0) / 1024**3
    if kind == "embedding":
        return round(weights * 1.2 + 1.0, 2)
    kv_cache = max(1.0, weights * 0.25)
    return round(weights + kv_cache + 1.5, 2)
