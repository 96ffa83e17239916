"""The fake engine: a real OpenAI-compatible HTTP server that answers deterministically, no model.

For tests, benchmarks and the demo only. Chat and completion answers echo the prompt; embeddings
are unit vectors derived from a hash of the text. Faults can be injected with flags:
``--startup-delay S`` (slow load), ``--crash-after S`` / ``--exit-code N`` (crash),
``--hang-after S`` (stops answering, ignores SIGTERM), ``--latency-ms N`` (slow answers),
``--stream-delay-ms N`` (a pause between streamed chunks, as tokens come from a real model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sage_mq.engines import openai_shapes as shapes


class FakeEngine:
    """The answers of one fake engine."""

    def __init__(
        self, model: str, *, dim: int = 384, latency_ms: float = 0.0, stream_delay_ms: float = 0.0
    ) -> None:
        self.model = model
        self.dim = dim
        self.latency_s = latency_ms / 1000
        self.stream_delay_s = stream_delay_ms / 1000

    def answer(self, prompt: str, max_tokens: int | None) -> shapes.Answer:
        """The deterministic answer to a prompt: an echo, cut to ``max_tokens`` words (a word
        is a token here), and why it ended (``length`` when cut, as an engine says)."""
        words = f"[{self.model}] You said: {prompt}".split()
        if max_tokens and len(words) > max_tokens:
            return " ".join(words[:max_tokens]), "length"
        return " ".join(words), "stop"

    def embed(self, text: str) -> list[float]:
        """A deterministic unit vector for a text."""
        raw = b""
        counter = 0
        while len(raw) < self.dim * 4:
            raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
            counter += 1
        ints = struct.unpack(f"<{self.dim}i", raw[: self.dim * 4])
        vector = [i / 2**31 for i in ints]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    async def pause(self) -> None:
        """The injected latency, if any."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)


def build_app(engine: FakeEngine, on_start: Callable[[], None] | None = None) -> Starlette:
    """The Starlette app of a fake engine; ``on_start`` runs once the loop is up."""
    api = _Api(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if on_start:
            on_start()
        yield

    return Starlette(
        routes=[
            Route("/health", api.health),
            Route("/v1/models", api.models),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/embeddings", api.embeddings, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


class _Api:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, _: Request) -> Response:
        return JSONResponse(shapes.models_body(self.engine.model, "sage-mq-fake"))

    async def chat(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bad("'messages' must be a non-empty list", "messages")
        try:
            n = shapes.choices_wanted(body)
        except ValueError as exc:
            return _bad(str(exc), "n")
        prompt = _last_user_text(messages)
        await self.engine.pause()
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        answers = [self.engine.answer(prompt, limit)] * n  # deterministic: n times the same
        model, prompt_tokens = self.engine.model, len(prompt.split())
        if body.get("stream"):
            counted = shapes.wants_usage_in_stream(body)
            chunks = _stream(model, answers, prompt_tokens, counted, self.engine.stream_delay_s)
            return StreamingResponse(chunks, media_type="text/event-stream")
        return JSONResponse(shapes.chat_body(model, answers, prompt_tokens))

    async def completions(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return _bad("'prompt' must be a string", "prompt")
        try:
            n = shapes.choices_wanted(body)
        except ValueError as exc:
            return _bad(str(exc), "n")
        await self.engine.pause()
        answers = [self.engine.answer(prompt, body.get("max_tokens"))] * n
        return JSONResponse(shapes.completion_body(self.engine.model, answers, len(prompt.split())))

    async def embeddings(self, request: Request) -> Response:
        body = await _json(request)
        if isinstance(body, Response):
            return body
        try:
            texts = shapes.embedding_inputs(body)
        except ValueError as exc:
            return _bad(str(exc), "input")
        try:
            dimensions = shapes.dimensions_wanted(body, self.engine.dim)
        except ValueError as exc:
            return _bad(str(exc), "dimensions")
        await self.engine.pause()
        vectors = [shapes.shortened(self.engine.embed(t), dimensions) for t in texts]
        fmt = str(body.get("encoding_format") or "float")
        return JSONResponse(shapes.embeddings_body(self.engine.model, vectors, texts, fmt))


async def _json(request: Request) -> dict[str, Any] | Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _bad("request body is not valid JSON", None)
    return body if isinstance(body, dict) else _bad("request body must be a JSON object", None)


def _bad(message: str, param: str | None) -> Response:
    return JSONResponse(shapes.error_body(message, param=param), status_code=400)


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


async def _stream(
    model: str, answers: list[shapes.Answer], prompt_tokens: int, counted: bool, delay_s: float
) -> AsyncIterator[str]:
    """Each answer word by word (choice after choice), its end, then the usage if asked."""
    chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def chunk(index: int, delta: dict[str, str], finish: str | None) -> str:
        return _sse(
            shapes.chat_chunk(chunk_id, model, delta, finish, index=index, with_usage=counted)
        )

    for index, (text, finish) in enumerate(answers):
        yield chunk(index, {"role": "assistant", "content": ""}, None)
        for i, word in enumerate(text.split()):
            if delay_s:
                await asyncio.sleep(delay_s)
            yield chunk(index, {"content": (" " if i else "") + word}, None)
        yield chunk(index, {}, finish)
    if counted:
        done = sum(len(text.split()) for text, _ in answers)
        yield _sse(shapes.usage_chunk(chunk_id, model, shapes.usage(prompt_tokens, done)))
    yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The fake engine's command line."""
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    """The fake engine's flags (what a request may pass is held to these, see argv_policy)."""
    p = argparse.ArgumentParser(prog="sage-mq-fake-engine", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", help="the name it answers to (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kind", choices=("llm", "embedding"), default="llm")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension")
    p.add_argument("--startup-delay", type=float, default=0.0, metavar="S")
    p.add_argument("--crash-after", type=float, default=None, metavar="S")
    p.add_argument("--exit-code", type=int, default=1, metavar="N")
    p.add_argument("--hang-after", type=float, default=None, metavar="S")
    p.add_argument("--latency-ms", type=float, default=0.0, metavar="N")
    p.add_argument("--stream-delay-ms", type=float, default=0.0, metavar="N")
    p.add_argument(
        "--child",
        action="store_true",
        help="fork a worker that leaves the process group, as vLLM's EngineCore outlives its "
        "API server unless killed",
    )
    return p


def _schedule_faults(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    if args.crash_after is not None:
        loop.call_later(args.crash_after, _crash, args.crash_after, args.exit_code)
    if args.hang_after is not None:
        loop.call_later(args.hang_after, _hang, args.hang_after)


def _crash(after: float, code: int) -> None:
    print(f"fake engine: crashing on purpose after {after}s with exit code {code}", flush=True)
    os._exit(code)


def _hang(after: float) -> None:
    print(f"fake engine: hanging on purpose after {after}s", flush=True)
    while True:  # a deadlock: the loop never runs again, SIGTERM's handler never completes
        time.sleep(3600)


def _fork_child() -> None:
    """A worker of our own in a session of its own: it sleeps until killed, and dies with
    nothing (no parent to tell it)."""
    if os.fork() == 0:
        os.setsid()
        while True:
            time.sleep(3600)


def main(argv: list[str] | None = None) -> None:
    """Run a fake engine until SIGTERM."""
    args = parse_args(argv)
    if args.child:
        _fork_child()
    if args.startup_delay:
        print(f"fake engine: loading {args.model} for {args.startup_delay}s", flush=True)
        time.sleep(args.startup_delay)
    engine = FakeEngine(
        args.served_model_name or args.model,
        dim=args.dim,
        latency_ms=args.latency_ms,
        stream_delay_ms=args.stream_delay_ms,
    )
    app = build_app(engine, on_start=lambda: _schedule_faults(args))
    print(f"fake engine: serving {args.model} on http://{args.host}:{args.port}", flush=True)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run()
    sys.exit(0 if server.started else 3)


if __name__ == "__main__":
    main()
