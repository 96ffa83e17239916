"""sage-mq's embedding server: OpenAI-compatible ``/v1/embeddings`` on sentence-transformers.

``python -m sage_mq.engines.embedding_server --model M --host H --port P --device cuda|cpu``.
The model loads before the port opens, so ``/health`` answering means ready. Without
sentence-transformers (``pip install 'sage-mq[embedding]'``) it exits at once with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Protocol, cast

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sage_mq.engines import openai_shapes as shapes

EXIT_MISSING_DEPENDENCY = 2
EXIT_MODEL_LOAD = 3


class Encoder(Protocol):
    """What we need of a SentenceTransformer."""

    def encode(self, sentences: list[str], **kwargs: Any) -> Any:
        """Vectors for the sentences."""
        ...


def build_app(model_name: str, encoder: Encoder, *, max_batch: int = 2048) -> Starlette:
    """The app serving one loaded encoder."""

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name})

    async def models(_: Request) -> Response:
        return JSONResponse(shapes.models_body(model_name, "sage-mq"))

    async def embeddings(request: Request) -> Response:
        try:
            body = await request.json()
            texts = shapes.embedding_inputs(body if isinstance(body, dict) else {})
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse(shapes.error_body("request body is not valid JSON"), 400)
        except ValueError as exc:
            return JSONResponse(shapes.error_body(str(exc), param="input"), 400)
        if len(texts) > max_batch:
            message = f"at most {max_batch} inputs per request; got {len(texts)}"
            return JSONResponse(shapes.error_body(message, param="input"), 400)
        vectors = await run_in_threadpool(
            encoder.encode, texts, normalize_embeddings=True, convert_to_numpy=True
        )
        try:
            dimensions = shapes.dimensions_wanted(body, len(vectors[0]))
        except ValueError as exc:
            return JSONResponse(shapes.error_body(str(exc), param="dimensions"), 400)
        fmt = str(body.get("encoding_format") or "float")
        rows = [shapes.shortened([float(x) for x in v], dimensions) for v in vectors]
        return JSONResponse(shapes.embeddings_body(model_name, rows, texts, fmt))

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The embedding server's command line."""
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    """The embedding server's flags (what a request may pass is held to these)."""
    p = argparse.ArgumentParser(prog="sage-mq-embedding-server", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", help="the name it answers to (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cpu")
    p.add_argument("--max-batch", type=int, default=2048)
    return p


def load_encoder(model: str, device: str) -> Encoder:
    """Load a SentenceTransformer; exits with one line if that is impossible."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        sys.stderr.write(
            "embedding server: sentence-transformers is not installed; "
            "install it with: pip install 'sage-mq[embedding]'\n"
        )
        sys.exit(EXIT_MISSING_DEPENDENCY)
    try:
        encoder = cast(Encoder, SentenceTransformer(model, device=device))
    except Exception as exc:  # a hub error, a bad path, CUDA missing: all end the same way
        sys.stderr.write(f"embedding server: cannot load {model!r} on {device}: {exc}\n")
        sys.exit(EXIT_MODEL_LOAD)
    return encoder


def main(argv: list[str] | None = None) -> None:
    """Load the model, then serve until SIGTERM."""
    args = parse_args(argv)
    print(f"embedding server: loading {args.model} on {args.device}", flush=True)
    encoder = load_encoder(args.model, args.device)
    print(f"embedding server: serving {args.model} on http://{args.host}:{args.port}", flush=True)
    app = build_app(args.served_model_name or args.model, encoder, max_batch=args.max_batch)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
