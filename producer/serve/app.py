"""The ASGI app: /v1 (OpenAI Files + Batches, Anthropic Message Batches), / (the dashboard), /dashboard/state
(its data)."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from batchgen.jobs.files import FileStore
from batchgen.producer.client import BatchClient
from batchgen.producer.serve.auth import key_checker
from batchgen.producer.serve.batches_api import batches_router
from batchgen.producer.serve.dashboard import WorkerHistory, dashboard_state
from batchgen.producer.serve.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    validation_error_handler,
)
from batchgen.producer.serve.files_api import files_router
from batchgen.producer.serve.message_batches_api import message_batches_router
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)


def create_app(client: BatchClient, files: FileStore, api_keys: Sequence[str] = (),
               history_interval_s: float = 10.0) -> FastAPI:
    history = WorkerHistory(history_interval_s)

    async def sample_forever() -> None:
        while True:
            try:
                history.sample(await run_in_threadpool(client.workers))
            except Exception:  # a Redis blip must not end the sampling for good
                log.warning("sampling workers failed", exc_info=True)
            await asyncio.sleep(history_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(sample_forever())
        yield
        task.cancel()

    app = FastAPI(title="batchgen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    auth = [Depends(key_checker(api_keys))]
    app.include_router(files_router(client, files), prefix="/v1", dependencies=auth)
    app.include_router(batches_router(client, files), prefix="/v1", dependencies=auth)
    app.include_router(message_batches_router(client), prefix="/v1", dependencies=auth)

    @app.get("/dashboard/state", dependencies=auth)
    def state() -> dict:
        return dashboard_state(client, history)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
