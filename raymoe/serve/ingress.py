"""The ingress deployment: OpenAI-compatible HTTP in front of the generation backend.

It validates (pydantic), tokenizes (chat template included), checks the context, then streams the
backend's deltas out as JSON or SSE. Every client mistake is a 4xx with an OpenAI-style error body;
full queues are a 503 with Retry-After before any byte is sent; a client that disconnects cancels
its backend stream, which aborts the sequence.

The backend is a deployment handle, or (`serve.ingress_in_engine`, backend None) the engine in this
replica's own process behind the same calls (`raymoe.serve.local_backend`); then this deployment
is the app's "engine" and answers the engine's handle calls made of it (`stats` while draining).
"""

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raymoe.config import parse_config
from raymoe.engine.chunks import build_prompt, locate_chunks
from raymoe.errors import InvalidRequestError
from raymoe.model.tokenizer import ChatTemplateError, Tokenizer
from raymoe.serve.admin import AdminRoutes
from raymoe.serve.direct import bind_reusing_address
from raymoe.serve.documents import chat_documents, completion_parts, split_rendered
from raymoe.serve.drain import DrainMark
from raymoe.serve.generation import Echo, Generation
from raymoe.serve.health import report
from raymoe.serve.local_backend import LocalBackend, local_engine
from raymoe.serve.logprobs_format import LogprobsFormat
from raymoe.serve.metrics import ServeMetrics
from raymoe.serve.openai_api import (
    ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, ScaleRequest, new_id,
)  # fmt: skip
from raymoe.serve.body import parse_body
from raymoe.serve.fields import check_fields
from raymoe.serve.protocol import APIError, bound_chunks, check_api_key, overloaded, sampling_params

logger = logging.getLogger(__name__)
app = FastAPI(title="raymoe", docs_url=None, redoc_url=None)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the response


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return exc.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown route, wrong method
    code = HTTP_CODES.get(exc.status_code, "invalid_request")
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    logger.exception("unexpected error serving %s", request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").response()


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, model_path: str, model_name: str, backend=None):
        bind_reusing_address()  # before Serve starts this replica's HTTP server (direct HTTP)
        self.config = parse_config(config)
        self.backend = backend if backend is not None else local_engine(config, model_path)
        self.tokenizer = Tokenizer.from_dir(model_path)
        self.model_name = model_name
        self.metrics = ServeMetrics(model_name)
        self.admin = AdminRoutes(self.backend, self.config, model_name)
        self._info: dict | None = None
        self.draining = DrainMark()

    # ----- OpenAI routes ---------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        check_api_key(request, self.config.serve.api_key)
        info = await self._backend_info()
        card = ModelCard(id=self.model_name, created=0, max_model_len=info["max_model_len"])
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._observed("completions", self._completions(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._observed("chat", self._chat(request))

    async def _completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"send one prompt per request (got a list of {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if req.raymoe_documents:
            if not isinstance(prompt, str):
                raise APIError(400, "raymoe_documents needs the prompt as text", param="raymoe_documents")
            prompt_ids = self._with_documents(req, completion_parts(prompt, req.raymoe_documents), True)
        else:
            prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        echo = Echo(prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt), list(prompt_ids))
        return await self._generate(req, prompt_ids, chat=False, echo=echo if req.echo else Echo())

    def _with_documents(self, req, parts: list, special: bool) -> list[int]:
        """Prompt ids from parts (each tokenized alone); the documents become req.raymoe_chunks."""
        if req.raymoe_chunks is not None:
            raise APIError(400, "send documents or raymoe_chunks, not both", param="raymoe_chunks")
        encode = lambda text, add: self.tokenizer.encode(text, add_special_tokens=add and special)  # noqa: E731
        try:
            ids, reuse = build_prompt(encode, parts)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="raymoe_documents") from None
        if reuse is not None:  # documents too short to be worth a forward of their own are plain text
            chunks = [list(c) for c in reuse.chunks if len(c) >= self.config.serve.min_chunk_tokens]
            req.raymoe_chunks = chunks or None
        return ids

    async def _chat(self, request: Request):
        req = await self._parse(request, ChatCompletionRequest)
        try:
            messages, documents = chat_documents([m.model_dump(exclude_none=True) for m in req.messages])
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if documents:
                return await self._generate(req, self._with_documents(req, split_rendered(text, documents), False),
                                            chat=True)  # fmt: skip
        except (ChatTemplateError, InvalidRequestError) as e:
            raise APIError(400, str(e), param="messages") from None
        return await self._generate(req, self.tokenizer.encode(text, add_special_tokens=False), chat=True)

    async def _parse(self, request: Request, model):
        check_api_key(request, self.config.serve.api_key)
        req = await parse_body(request, model, self.config.serve.max_body_bytes, self.config.serve.body_timeout_s)
        check_fields(req)
        if req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        return req

    async def _generate(self, req, prompt_ids: list[int], chat: bool, echo: Echo | None = None):
        start = time.perf_counter()
        info = await self._backend_info()
        if not prompt_ids:
            raise APIError(400, "the prompt is empty: send at least one token of text", param="prompt")
        vocab = info["vocab_size"]
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        params = sampling_params(req, len(prompt_ids), info["max_model_len"], self.config.serve.default_max_tokens)
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            if any(t >= vocab for t in ids):
                raise APIError(400, f"{name}: token ids must be in [0, {vocab})", param=name, code="invalid_value")
        if params.chunk_reuse is not None:  # every backend: a span not in the prompt is the client's 400
            bound_chunks(params.chunk_reuse, self.config.serve.max_chunks_per_request, self.config.serve.min_chunk_tokens)
            try:
                locate_chunks(prompt_ids, params.chunk_reuse.chunks)
            except InvalidRequestError as e:
                raise APIError(400, str(e), param="raymoe_chunks") from None
        request_id = new_id("chatcmpl" if chat else "cmpl")
        stream = await self._admit(request_id, prompt_ids, params)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        echo = echo or Echo()
        logprobs = LogprobsFormat(self.tokenizer) if params.logprobs is not None else None
        gen = Generation(request_id, self.model_name, len(prompt_ids), stream, self.metrics, start, params.n, logprobs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = gen.chat_events(include_usage) if chat else gen.completion_events(include_usage, echo)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return JSONResponse(await (gen.chat_body() if chat else gen.completion_body(echo)))

    async def _admit(self, request_id: str, prompt_ids: list[int], params):
        """Start the backend stream; raise 503/400 if it did not take the request."""
        if self.draining.is_set():
            raise overloaded("the server is shutting down; retry (another replica takes it)", self.config.serve.retry_after_s)
        stream = self.backend.options(stream=True).generate.remote(request_id, prompt_ids, params)
        try:
            first = await stream.__anext__()
        except Exception as e:  # Serve's own back-pressure, or the backend replica died
            stream.cancel()
            logger.warning("backend refused %s: %s", request_id, e)
            raise overloaded(f"the backend cannot take requests now ({type(e).__name__}); retry later",
                             self.config.serve.retry_after_s) from None  # fmt: skip
        if "error" in first:
            kind, message = first["error"]["kind"], first["error"]["message"]
            if kind == "overloaded":
                raise overloaded(message, self.config.serve.retry_after_s)
            raise APIError(400, message, param="prompt")
        return stream

    async def _observed(self, route: str, handler):
        self.metrics.in_flight.inc()
        status = 500
        try:
            response = await handler
            status = response.status_code
            return response
        except APIError as e:
            status = e.status
            raise
        except asyncio.CancelledError:  # the client went away (a non-streaming request): not our error
            status = CLIENT_CLOSED
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe_request(route, status)

    async def _backend_info(self) -> dict:
        if self._info is None:
            self._info = await self.backend.info.remote()
        return self._info

    # ----- handle calls: the engine in this replica (serve.ingress_in_engine) ------------------
    async def info(self) -> dict:
        return await self.backend.info.remote()

    async def stats(self) -> dict:
        return await self.backend.stats.remote()

    def check_health(self) -> None:
        """Serve calls this; a dead engine process or stepping thread held here replaces the replica."""
        if isinstance(self.backend, LocalBackend):
            self.backend.check_health()

    def __del__(self):
        if isinstance(getattr(self, "backend", None), LocalBackend):
            self.backend.close()

    # ----- operations ------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        return await report(self.backend, self.model_name, self.draining)

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        try:
            self.metrics.update_backend(await asyncio.wait_for(self.backend.stats.remote(), timeout=10))
        except Exception as e:  # still serve the ingress' own metrics
            logger.warning("backend stats unavailable: %s", e)
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/cluster")
    async def admin_cluster(self, request: Request) -> JSONResponse:
        return await self.admin.cluster(request)

    @app.post("/admin/rebalance")
    async def admin_rebalance(self, request: Request) -> JSONResponse:
        return await self.admin.rebalance(request)

    @app.post("/admin/scale")
    async def admin_scale(self, request: Request) -> JSONResponse:
        check_api_key(request, self.config.serve.api_key)
        req = await parse_body(request, ScaleRequest, self.config.serve.max_body_bytes, self.config.serve.body_timeout_s)
        return await self.admin.scale(req)
