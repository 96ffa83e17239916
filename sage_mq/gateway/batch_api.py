"""OpenAI's Batch API on the gateway: files (``purpose=batch``) and batches.

``POST /v1/files``, ``GET /v1/files``, ``GET /v1/files/{id}``, ``DELETE /v1/files/{id}``,
``GET /v1/files/{id}/content``,
``POST /v1/batches``, ``GET /v1/batches``, ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``; and one of ours, ``GET /v1/batches/{id}/results?after=N``:
output and error lines in the order they finished, for callers who want results before the
batch ends. Errors are in OpenAI's shape. The work itself is done by rq workers
(``sage llm worker run``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from starlette.responses import JSONResponse, Response

from sage_mq.batch.service import BatchNotCancellable, BatchNotFound, BatchService
from sage_mq.errors import ControlPlaneUnavailable, InvalidRequest
from sage_mq.fields import storable_text
from sage_mq.gateway.proxy import openai_error
from sage_mq.ids import BATCH_ID_PATTERN, FILE_ID_PATTERN

FileId = Annotated[str, Path(pattern=FILE_ID_PATTERN)]
BatchId = Annotated[str, Path(pattern=BATCH_ID_PATTERN)]
MetaKey = Annotated[str, StringConstraints(max_length=64), AfterValidator(storable_text)]
MetaValue = Annotated[str, StringConstraints(max_length=512), AfterValidator(storable_text)]


class BatchCreate(BaseModel):
    """The body of ``POST /v1/batches`` (OpenAI's: metadata is up to 16 short pairs)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    input_file_id: str = Field(pattern=FILE_ID_PATTERN)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[MetaKey, MetaValue] | None = Field(None, max_length=16)


def batch_router(parts: dict[str, Any]) -> APIRouter:
    """The routes, over the app's :class:`BatchService` (``parts["batches"]``)."""
    router = APIRouter(prefix="/v1")

    def service() -> BatchService:
        batches: BatchService = parts["batches"]
        return batches

    _file_routes(router, service)
    _batch_routes(router, service)
    return router


def _file_routes(router: APIRouter, service: Callable[[], BatchService]) -> None:
    @router.post("/files")
    async def upload(
        file: Annotated[UploadFile, File()], purpose: Annotated[Literal["batch"], Form()]
    ) -> Response:
        # read from where the upload was spooled, a slice at a time (never whole in memory)
        return await _answer(
            service().records.create_file(file, file.filename or "upload", purpose)
        )

    @router.get("/files")
    async def files(
        after: Annotated[str | None, Query(pattern=FILE_ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
        purpose: str | None = None,
    ) -> Response:
        return await _answer(service().list_files(after, limit, purpose))

    @router.get("/files/{file_id}")
    async def file_info(file_id: FileId) -> Response:
        return await _answer(_must(service().records.get_file(file_id), f"no file {file_id!r}"))

    @router.delete("/files/{file_id}")
    async def delete_file(file_id: FileId) -> Response:
        return await _answer(service().delete_file(file_id))

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: FileId) -> Response:
        try:
            content = await service().records.file_content(file_id)
        except ControlPlaneUnavailable as exc:
            return openai_error(503, str(exc), "service_unavailable")
        if content is None:
            return openai_error(404, f"no file {file_id!r}", "invalid_request_error", "not_found")
        return Response(content, media_type="application/jsonl")


def _batch_routes(router: APIRouter, service: Callable[[], BatchService]) -> None:
    @router.post("/batches")
    async def create(body: BatchCreate) -> Response:
        return await _answer(
            service().create(
                body.input_file_id, body.endpoint, body.completion_window, body.metadata
            )
        )

    @router.get("/batches")
    async def batches(
        after: Annotated[str | None, Query(pattern=BATCH_ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> Response:
        return await _answer(service().list(after, limit))

    @router.get("/batches/{batch_id}/results")
    async def results(
        batch_id: BatchId,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> Response:
        return await _answer(service().finished(batch_id, after, limit))

    @router.get("/batches/{batch_id}")
    async def get(batch_id: BatchId) -> Response:
        return await _answer(service().get(batch_id))

    @router.post("/batches/{batch_id}/cancel")
    async def cancel(batch_id: BatchId) -> Response:
        return await _answer(service().cancel(batch_id))


async def _must(pending: Any, missing: str) -> Any:
    found = await pending
    if found is None:
        raise BatchNotFound(missing)
    return found


async def _answer(pending: Any) -> Response:
    try:
        return JSONResponse(await pending)
    except BatchNotFound as exc:
        return openai_error(404, str(exc), "invalid_request_error", "not_found")
    except BatchNotCancellable as exc:
        return openai_error(409, str(exc), "invalid_request_error", "batch_not_cancellable")
    except InvalidRequest as exc:
        return _bad(str(exc))
    except ControlPlaneUnavailable as exc:
        return openai_error(503, str(exc), "service_unavailable")


def _bad(message: str) -> JSONResponse:
    return openai_error(400, message, "invalid_request_error")
