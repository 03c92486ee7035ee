"""The HTTP service: FastAPI routes over a `Batcher`, and the `serve.py` entry point."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.utils import logging as transformers_logging

from ..arguments import ArgumentError
from ..console import quiet_library_noise
from ..errors import SafetyClassifierError
from ..inference import Classifier
from ..modeling import describe_dtype
from .auth import BearerAuth
from .batcher import Batcher, ServiceUnavailable, UnreadableInput, new_model_thread
from .cli_args import ServeArguments
from .memory import limit_malloc_arenas
from .metrics import ServiceMetrics
from .protocol import ApiError, ModerationResponse, parse_moderation_request

logger = logging.getLogger("safety_classifier.serving")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def access_note(args: ServeArguments) -> str:
    """Who may use the service, as the start-up line says it."""
    if args.api_key:
        return "API key required (Authorization: Bearer) on every route but /health"
    return f"no API key: anyone who reaches {args.host}:{args.port} can use it"


def error_response(error: ApiError) -> JSONResponse:
    """`error`'s status and OpenAI error body; a 503 tells the client when to retry."""
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=headers)


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed the limit."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise too_large
    return bytes(body)


def create_app(args: ServeArguments, load: Callable[[], Classifier] | None = None,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI application. `load` builds the classifier (default: `load_classifier` with the
    arguments); it runs on the model thread after the server starts listening, so /health answers
    while the model loads and /ready turns 200 only after a warm-up pass."""
    metrics = ServiceMetrics()
    state: dict[str, Any] = {"batcher": None, "ready": False, "draining": False, "failed": None, "served": 0}
    model_name = args.model_name or Path(args.model_dir).resolve().name

    def default_load() -> Classifier:
        from ..inference import load_classifier

        return load_classifier(args.model_dir, device=args.device, dtype=args.dtype, base_model=args.base_model,
                               trust_remote_code=args.trust_remote_code)

    async def bring_up() -> None:
        started = time.perf_counter()
        model_thread = new_model_thread()
        try:
            classifier = await asyncio.get_running_loop().run_in_executor(model_thread, load or default_load)
            if args.threshold is not None:
                classifier.set_threshold(args.threshold)
            batcher = Batcher(classifier, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                              max_gather_tokens=args.max_gather_tokens, metrics=metrics, trim_heap=args.trim_heap,
                              model_thread=model_thread, return_wait_share=args.return_wait_share)
            await batcher.start()
            state["batcher"] = batcher
            await batcher.warm_up()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - reported, then the server is stopped
            state["failed"] = error
            if state["batcher"] is None:
                model_thread.shutdown(wait=False, cancel_futures=True)
            message = str(error) if isinstance(error, SafetyClassifierError) else repr(error)
            logger.error("cannot serve %s: %s", args.model_dir, message)
            if on_load_failure is not None:
                on_load_failure(error)
            return
        state["ready"] = True
        metrics.ready.set(1)
        device = next(classifier.model.parameters()).device
        answers = (f"answers at threshold {classifier.threshold_for('response'):.4f}" if classifier.judges_responses
                   else "not trained on answers")
        logger.info("ready: %s on http://%s:%d (%s, %s, threshold %.4f, categories %s, %s), loaded and warmed up "
                    "in %.1f s; %s", model_name, args.host, args.port, device, describe_dtype(args.dtype, device),
                    classifier.threshold, ",".join(batcher.names), answers, time.perf_counter() - started,
                    access_note(args))

    @asynccontextmanager
    async def lifespan(app):
        # An open service beyond this machine is worth a warning before the model even loads.
        exposed = not args.api_key and args.host not in LOOPBACK_HOSTS
        logger.log(logging.WARNING if exposed else logging.INFO, "starting: %s", access_note(args))
        bringing_up = asyncio.create_task(bring_up(), name="moderation-load")
        yield
        state["draining"] = True
        metrics.ready.set(0)
        if not bringing_up.done():
            bringing_up.cancel()
        if state["batcher"] is not None:
            await state["batcher"].close()
        if state["failed"] is None:
            logger.info("stopped: %d moderation request(s) answered, queue drained", state["served"])

    app = FastAPI(title="safety-classifier moderation", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = state
    app.state.metrics = metrics
    if args.api_key:
        app.add_middleware(BearerAuth, key=args.api_key, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                       code=code))

    @app.get("/health")
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: the model is loaded and warmed up, and the service is not draining."""
        if state["ready"] and not state["draining"]:
            return {"status": "ready", "model": model_name}
        status = "draining" if state["draining"] else ("failed" if state["failed"] else "loading")
        return JSONResponse({"status": status, "model": model_name}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        """OpenAI moderation: {"input": str | [str] | [message], "model"?} -> {"id", "model", "results"}."""
        started = time.perf_counter()
        try:
            moderation = parse_moderation_request(await read_body(request, args.max_body_bytes), args.max_inputs)
            batcher = state["batcher"]
            if not state["ready"] or batcher is None:
                raise ApiError(503, "the model is not loaded yet; retry when GET /ready answers 200",
                               code="model_not_ready", error_type="service_unavailable")
            try:
                results = await batcher.submit(moderation.input)
            except UnreadableInput as error:  # e.g. a conversation's answer, where no pair template fits
                param = "input" if len(moderation.input) == 1 else f"input[{error.index}]"
                raise ApiError(422, f"this classifier cannot read '{param}': {error}", param=param,
                               code="unsupported_input") from None
            except ServiceUnavailable as error:
                raise ApiError(503, str(error), code="shutting_down", error_type="service_unavailable") from None
            except Exception:  # noqa: BLE001 - already logged with its traceback by the batcher
                raise ApiError(500, "the model failed on the batch this request was in; retry it",
                               code="model_error") from None
            response = JSONResponse(ModerationResponse(model=model_name, results=results).model_dump())
        except ApiError as error:
            response = error_response(error)
        except Exception:  # never let one request take the service down
            logger.exception("unexpected error answering POST /v1/moderations")
            response = error_response(ApiError(500, "internal error", code="internal_error"))
        state["served"] += 1
        metrics.requests.labels(code=str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    return app


def _configure_logging(level: str) -> None:
    """One line per startup and shutdown, and errors: no access log, no library chatter."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").disabled = True
    quiet_library_noise()  # what the scripts silence (load report of a new head, kernel notes, progress bars)
    # A service's log is read by operators: the libraries' deprecation notes are for developers.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for module in ("transformers", "peft", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    transformers_logging.set_verbosity_error()


def serve(args: ServeArguments) -> int:
    """Run the service until SIGTERM/SIGINT: 0 after a graceful stop, 1 if the model could not be served."""
    import uvicorn

    from ..artifacts import read_metadata

    try:
        read_metadata(args.model_dir)  # an unusable directory fails now, before the server starts
    except SafetyClassifierError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)
    limit_malloc_arenas(args.malloc_arenas)
    server: uvicorn.Server | None = None

    def stop_on_failure(_: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(args, on_load_failure=stop_on_failure)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="on", access_log=False, log_config=None,
                            log_level="warning", timeout_graceful_shutdown=args.graceful_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it has drained; a handler here makes a
    # SIGTERM stop an ordinary exit (status 0) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        return 130
    return 1 if app.state.service["failed"] is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`serve.py` / `safety-classifier-serve`: parse `ServeArguments`, serve; 2 for a bad argument."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ServeArguments, description="Serve a safety classifier as an OpenAI-compatible "
                                                          "moderation endpoint (POST /v1/moderations).")
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ArgumentError as error:  # refused before the model directory is even read
        print(f"error: {error}", file=sys.stderr)
        return 2
    return serve(args)
