"""The HTTP API (FastAPI): ``POST /v1/images``, ``GET /v1/models``, ``/healthz``,
``/readyz``, ``/metrics`` (Prometheus), and the OpenAPI docs at ``/docs``."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field

from ldm.serving.batcher import Batcher, QueueFull
from ldm.serving.service import BadRequest, ImageService, Settings, Work

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there

log = logging.getLogger(__name__)


class ImageRequest(BaseModel):
    """What ``POST /v1/images`` takes. Unset settings take the sampler's defaults."""

    prompt: str | list[str] | None = Field(None, description="caption(s); n images each")
    labels: list[int] | None = Field(None, description="class labels (class-conditioned models)")
    negative_prompt: str | None = Field(None, description="guidance pushes away from it")
    n: int = Field(1, ge=1, description="images per prompt or label")
    sampler: str = "ddim"
    steps: int | None = Field(None, description="default: the sampler config's")
    guidance: float = Field(3.0, ge=0.0, le=30.0, description="classifier-free guidance scale")
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    eta: float | None = Field(None, ge=0.0, le=1.0, description="ddim / euler_ancestral only")
    seed: int | None = Field(
        None, ge=0, lt=2**31, description="image k of each prompt gets seed + k; default random"
    )
    size: int | list[int] | None = Field(None, description="side or [height, width]")
    adapters: dict[str, float] = Field(
        default_factory=dict, description="LoRA files of adapters_dir with weights"
    )
    response_format: Literal["json", "png"] = Field(
        "json", description="json: base64 images with their seeds; png: one image's bytes"
    )


def _metrics() -> tuple[CollectorRegistry, dict[str, Any]]:
    registry = CollectorRegistry()
    latency_buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, math.inf)
    return registry, {
        "requests": Counter(
            "ldm_requests", "Image requests by HTTP status", ["status"], registry=registry
        ),
        "images": Counter("ldm_images", "Images generated", registry=registry),
        "queue": Gauge("ldm_queue_depth", "Requests waiting for a batch", registry=registry),
        "running": Gauge("ldm_images_in_progress", "Images being generated", registry=registry),
        "batch": Histogram(
            "ldm_batch_images",
            "Images per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        ),
        "latency": Histogram(
            "ldm_request_seconds", "Request latency", buckets=latency_buckets, registry=registry
        ),
    }


def _auth(token: str | None) -> Callable[[Request], None]:
    """A dependency: the bearer token must match (constant-time); no token: open."""

    def check(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.encode(), token.encode()):
            raise HTTPException(
                401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
            )

    return check


def _unprocessable(field: str, message: str) -> JSONResponse:
    """422 in FastAPI's own shape: ``{"detail": [{"loc": [...], "msg": ..., ...}]}``."""
    detail = [{"loc": ["body", *field.split(".", 1)], "msg": message, "type": "value_error"}]
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(
    service: ImageService,
    *,
    max_batch: int = 8,
    max_wait: float = 0.02,
    max_queue: int = 64,
    timeout: float = 120.0,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``service`` with dynamic batching."""
    if service.max_images > max_batch:
        raise ValueError(f"max_images={service.max_images} exceeds max_batch={max_batch}")
    registry, metric = _metrics()
    state: dict[str, Any] = {"ready": False}

    lifespan = _lifespan(
        service, state, metric, max_batch=max_batch, max_wait=max_wait, max_queue=max_queue
    )
    app = FastAPI(title="ldm", summary="Latent diffusion image generation", lifespan=lifespan)
    protected = [Depends(_auth(token))]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        batcher = state.get("batcher")
        ready = bool(state["ready"] and batcher is not None and batcher.alive)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        batcher = state.get("batcher")
        metric["queue"].set(batcher.depth if batcher else 0)
        metric["running"].set(batcher.running if batcher else 0)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=protected)
    def models() -> dict[str, Any]:
        return service.describe()

    app.add_middleware(_Count, metric=metric)

    @app.post("/v1/images", dependencies=protected)
    async def images(request: ImageRequest, http: Request) -> Response:
        try:
            settings, work = _parse(service, request)
            job = state["batcher"].submit(settings, len(work.seeds), work, timeout)
            pngs = await _unless_gone(http, job)
        except _ClientGone:  # nobody to answer; 499, nginx's "client closed request"
            return Response(status_code=499)
        except Exception as err:
            return _failure(err, retry=max(1, math.ceil(max_wait + timeout / 10)), timeout=timeout)
        metric["images"].inc(len(pngs))
        return _answer(service, request, settings, work, pngs)

    return app


def _lifespan(
    service: ImageService, state: dict[str, Any], metric: dict[str, Any], **batching: Any
) -> Callable[[FastAPI], Any]:
    """Start the batcher with the app, stop it (and report not ready) at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(service.run, on_batch=metric["batch"].observe, **batching)
        batcher.start()
        state.update(batcher=batcher, ready=True)
        yield
        state["ready"] = False
        await batcher.stop()

    return lifespan


class _Count:
    """Every answer of /v1/images by status (401 and FastAPI's 422 too), and its time. Pure
    ASGI (not ``@app.middleware``), so that the endpoint still sees its client disconnect."""

    def __init__(self, app: Any, metric: dict[str, Any]):
        self.app, self.metric = app, metric

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/images":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metric["requests"].labels(str(status)).inc()
            self.metric["latency"].observe(time.perf_counter() - start)


class _ClientGone(Exception):
    """The client disconnected before its images were ready."""


async def _unless_gone(http: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result; cancelled when the client disconnects first, so that a queued job
    it had not started is dropped (a batch already running finishes)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await http.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _ClientGone


def _failure(err: Exception, *, retry: int, timeout: float) -> JSONResponse:
    """The answer to a request that produced no images."""
    if isinstance(err, BadRequest):
        return _unprocessable(err.field, str(err))
    if isinstance(err, QueueFull):
        return JSONResponse(
            {"detail": f"busy: {err}; retry later"},
            status_code=429,
            headers={"Retry-After": str(retry)},
        )
    if isinstance(err, asyncio.TimeoutError):  # TimeoutError from Python 3.11 on
        return JSONResponse(
            {"detail": f"not done within the request timeout ({timeout:g} s)"}, status_code=504
        )
    log.error("generation failed", exc_info=err)  # the batch failed; the server goes on
    return JSONResponse({"detail": f"generation failed: {err}"}, status_code=500)


def _answer(
    service: ImageService, request: ImageRequest, settings: Settings, work: Work, pngs: list
) -> Response:
    """One PNG, or JSON with every image, its seed and the sample.py line that remakes it."""
    if request.response_format == "png":
        return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(work.seeds[0])})
    negative = request.negative_prompt
    shared = {
        "sampler": settings.sampler,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "guidance_rescale": settings.guidance_rescale,
        "eta": settings.eta,
        "size": list(settings.size),
        "adapters": dict(settings.adapters),
        "negative_prompt": negative,
    }
    images = [
        {
            "prompt": prompt,
            "seed": seed,
            "png_base64": base64.b64encode(png).decode(),
            "sample_py": service.regenerate(settings, prompt, negative, seed),
        }
        for prompt, seed, png in zip(work.inputs, work.seeds, pngs, strict=True)
    ]
    return JSONResponse({"settings": shared, "images": images})


def _parse(service: ImageService, request: ImageRequest) -> tuple[Settings, Work]:
    """The batch settings and the images of a request, checked against the service."""
    if service.labels:
        if request.labels is None or request.prompt is not None:
            raise BadRequest("labels", "this model is class-conditioned: give labels, not prompt")
        if request.negative_prompt:
            raise BadRequest("negative_prompt", "a class-conditioned model takes no prompts")
        service.check_labels(request.labels)
        inputs: list[Any] = list(request.labels)
    elif service.pipeline.conditioner is None:
        for field in ("prompt", "labels", "negative_prompt"):
            if getattr(request, field) is not None:
                raise BadRequest(field, f"this model is unconditional: it takes no {field}")
        inputs = [""]
    else:
        if request.prompt is None or request.labels is not None:
            raise BadRequest("prompt", "this model takes captions: give prompt, not labels")
        inputs = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if not inputs:
            raise BadRequest("prompt", "give at least one prompt")
    total = len(inputs) * request.n
    if total > service.max_images:
        raise BadRequest("n", f"{total} images asked; at most {service.max_images} per request")
    if request.response_format == "png" and total != 1:
        raise BadRequest("response_format", f"png answers one image; {total} were asked: use json")
    if not service.labels and service.pipeline.conditioner is not None:
        listed = isinstance(request.prompt, list)
        for i, text in enumerate(inputs):
            service.check_prompt(f"prompt.{i}" if listed else "prompt", text)
        if request.negative_prompt:
            service.check_prompt("negative_prompt", request.negative_prompt)
    steps, eta = service.check_sampler(request.sampler, request.steps, request.eta)
    settings = Settings(
        sampler=request.sampler,
        steps=steps,
        guidance=request.guidance,
        guidance_rescale=request.guidance_rescale,
        eta=eta,
        size=service.check_size(request.size),
        adapters=service.check_adapters(request.adapters),
    )
    base = request.seed if request.seed is not None else secrets.randbelow(2**31 - 2**16)
    jobs = [(x, base + k) for x in inputs for k in range(request.n)]  # as sample.py numbers them
    negative = [request.negative_prompt] * total if request.negative_prompt else None
    work = Work([x for x, _ in jobs], negative, [s for _, s in jobs])
    return settings, work
