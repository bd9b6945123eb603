"""``python -m lit_sahs serve``: a detector behind OpenAI-compatible HTTP endpoints.

    python -m lit_sahs serve --detector models:/tiny-guard@champion --port 8000

* ``POST /v1/moderations``: OpenAI's moderation API (``input``: a text or a list of texts) answered by
  the detector: ``flagged``, ``categories`` and ``category_scores`` per input (one category, ``unsafe``,
  for the safety-head families; SafeVLM's risk types for SafeVLM), at the artifact's calibrated
  threshold or ``--threshold``.
* ``POST /v1/chat/completions``: OpenAI's chat API answered by the target with the family's guard in
  the prefill of its own generate: a flagged conversation gets the refusal (``finish_reason``
  ``content_filter``), the others the target's greedy answer. System prompts and earlier turns go
  through the target's chat template (``targets.prompting``: the first-token position is still the
  last prompt position).
* ``GET /health``, ``GET /v1/metadata`` (target, detector family, threshold, fingerprint, categories),
  ``GET /v1/models``.

Concurrent requests are batched dynamically (``serving.Batcher``: up to ``--max_batch_size`` prompts,
waiting at most ``--batch_timeout`` seconds for the requests expected to fill a batch). Bad requests
get a 4xx with one message in OpenAI's error shape and the server keeps serving. Prompt text is never
logged unless ``--log_prompts``.

Built on FastAPI + uvicorn (the stack LitServe itself runs on) rather than LitServe: LitServe runs
each API in its own worker process with its own copy of the model, so moderation and chat could not
share one loaded target and one batch queue; OpenAI's moderation endpoint is not one of its specs;
and its request validation answers in its own error shape. A small asyncio batcher does the dynamic
batching LitServe would.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

from lit_sahs.errors import LitSahsError
from lit_sahs.options import ServeOptions
from lit_sahs.serving import Batcher, GuardService

log = logging.getLogger(__name__)


class ModerationRequest(BaseModel):
    """OpenAI's moderation request."""
    input: Union[str, list[str]]
    model: Optional[str] = None


class TextPart(BaseModel):
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None


class ChatRequest(BaseModel):
    """OpenAI's chat completion request (the fields a guarded greedy answer can honour; others are ignored)."""
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    n: Optional[int] = 1
    stream: Optional[bool] = False
    temperature: Optional[float] = None


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and one message for the client."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(message: str, code: str, param: Optional[str] = None) -> dict:
    """OpenAI's error shape (the official clients raise it as an APIStatusError with this message)."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads it (declared
    with Content-Length or sent in chunks)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(send)
            if not msg.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        log.info("413: request body over %d bytes", self.limit)
        payload = json.dumps(error_body(f"request body is larger than {self.limit} bytes", "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def build_app(service: GuardService, opts: ServeOptions):
    """The FastAPI app: endpoints, request schemas, error handlers and the batcher's lifetime."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    model_name = opts.model_name or service.target.name

    def run(key, items: list) -> list:
        if key == "moderate":
            return service.moderate(items)
        return service.chat(items, max_new_tokens=key[1])

    batcher = Batcher(run, opts.max_batch_size, opts.batch_timeout)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="lit_sahs guard", lifespan=lifespan)
    app.state.batcher, app.state.service = batcher, service

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError):
        log.info("%d on %s: %s", e.status, request.url.path, e.message)
        return JSONResponse(error_body(e.message, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:  # the field and what is wrong with it; never the value sent (it may be prompt text)
            message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        log.info("400 on %s: %s", request.url.path, message)
        return JSONResponse(error_body(message, "invalid_request", where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "not_found" if e.status_code == 404 else "http_error"),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crashed(request: Request, e: Exception):
        log.error("500 on %s: %s", request.url.path, type(e).__name__)
        return JSONResponse(error_body(f"internal error ({type(e).__name__})", "internal_error"), status_code=500)

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != model_name:
            raise RequestError(404, f"model {name!r} is not served here: use {model_name!r}", "model_not_found",
                               "model")

    def checked(fn, *args, param: str):
        try:
            return fn(*args)
        except LitSahsError as e:
            raise RequestError(400, str(e), "invalid_prompt", param) from None

    async def submitted(key, item, param: str):
        try:
            return await batcher.submit(key, item)
        except LitSahsError as e:
            raise RequestError(400, str(e), "invalid_prompt", param) from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "batches": batcher.batches, "largest_batch": batcher.largest_batch}

    @app.get("/v1/metadata")
    async def metadata():
        return {"model": model_name, **service.metadata(), "max_batch_size": opts.max_batch_size,
                "max_new_tokens": opts.max_new_tokens}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lit_sahs"}]}

    @app.post("/v1/moderations")
    async def moderations(req: ModerationRequest):
        import asyncio

        t0 = time.perf_counter()
        check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise RequestError(400, "input is empty: give a text or a list of texts", param="input")
        if len(texts) > opts.max_inputs:
            raise RequestError(400, f"{len(texts)} inputs in one request: at most {opts.max_inputs}", param="input")
        for i, t in enumerate(texts):
            try:
                service.check(t)
            except LitSahsError as e:
                raise RequestError(400, f"input {i}: {e}", "invalid_prompt", "input") from None
        results = await asyncio.gather(*(submitted("moderate", t, "input") for t in texts))
        flagged = sum(r["flagged"] for r in results)
        log.info("moderation: %d input(s), %d flagged, %.0f ms%s", len(texts), flagged,
                 1000 * (time.perf_counter() - t0), f", inputs {texts!r}" if opts.log_prompts else "")
        return {"id": f"modr-{uuid.uuid4().hex}", "model": model_name,
                "results": [{"flagged": r["flagged"], "categories": r["categories"],
                             "category_scores": r["category_scores"],
                             "category_applied_input_types": {c: ["text"] for c in r["categories"]}}
                            for r in results]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        t0 = time.perf_counter()
        check_model(req.model)
        if req.stream:
            raise RequestError(400, "streaming is not supported: leave stream unset", param="stream")
        if req.n not in (None, 1):
            raise RequestError(400, "one answer per request: leave n at 1", param="n")
        if req.temperature not in (None, 0):  # greedy decoding only
            raise RequestError(400, "the guarded target decodes greedily: leave temperature unset or 0",
                               param="temperature")
        max_new = req.max_completion_tokens or req.max_tokens or opts.max_new_tokens
        if max_new > opts.max_new_tokens:
            raise RequestError(400, f"max_tokens {max_new} is over this server's limit of {opts.max_new_tokens}",
                               param="max_tokens")
        conv = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m, n)}
                for n, m in enumerate(req.messages)]
        prompt_tokens = checked(service.check, conv, max_new, param="messages")
        r = await submitted(("chat", max_new), conv, "messages")
        log.info("chat: %d message(s), %s, %.0f ms%s", len(conv), "flagged" if r["flagged"] else "answered",
                 1000 * (time.perf_counter() - t0), f", messages {conv!r}" if opts.log_prompts else "")
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["content"]},
                             "finish_reason": r["finish_reason"], "logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": r["completion_tokens"],
                          "total_tokens": prompt_tokens + r["completion_tokens"]},
                "guard": {"flagged": r["flagged"], "score": r["score"], "threshold": service.threshold}}

    def _text(m, n: int) -> str:
        if m.content is None or isinstance(m.content, str):
            return m.content or ""
        if any(p.type != "text" or p.text is None for p in m.content):
            raise RequestError(400, f"messages.{n}.content: only text parts are supported", param="messages")
        return "".join(p.text for p in m.content)

    return BodyLimit(app, opts.max_body_bytes)


def configure_log(opts: ServeOptions) -> None:
    """One INFO line per request on stderr (counts and timings; prompts only with --log_prompts)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in (__name__, "lit_sahs.serving"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
        lg.propagate = False


def serve_command(opts: ServeOptions) -> int:
    """Load the detector and its target, then serve until interrupted."""
    import uvicorn

    configure_log(opts)
    service = GuardService(opts.detector, opts.target, threshold=opts.threshold, refusal=opts.refusal,
                           device=opts.device, dtype=opts.dtype, tracking_uri=opts.tracking_uri,
                           answer_below=opts.answer_below, answer_direction=opts.answer_direction)
    app = build_app(service, opts)
    log.info("serving %s (%s detector, threshold %.4g) as %r on http://%s:%d", service.target.name,
             service.detector.family, service.threshold, opts.model_name or service.target.name, opts.host, opts.port)
    server = uvicorn.Server(uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning",
                                           access_log=False, lifespan="on"))
    server.run()
    return 0

