"""Turning HTTP requests into validated ones, and failures into OpenAI-style error responses.

Every failure a client can cause is an `APIError` with a 4xx status and the body
`{"error": {"message", "type", "param", "code"}}`; the handler in ingress.py renders it.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse

from raymoe.engine.chunks import DEFAULT_SHARE, ChunkReuse
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import InvalidRequestError, InvalidSamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def overloaded(message: str, retry_after_s: int) -> APIError:
    return APIError(503, message, "server_overloaded", code="server_overloaded",
                    headers={"Retry-After": str(retry_after_s)})  # fmt: skip


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                       "authentication_error", code="invalid_api_key")  # fmt: skip
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key provided; check the key the server was started with",
                       "authentication_error", code="invalid_api_key")  # fmt: skip


def sampling_params(req, num_prompt_tokens: int, max_model_len: int, default_max_tokens: int) -> SamplingParams:
    """The request's SamplingParams; max_tokens must fit the context with the prompt."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise APIError(400, f"the prompt has {num_prompt_tokens} tokens, but the context is {max_model_len} "
                       "tokens with room for at least 1 generated one: shorten the prompt",
                       param="prompt", code="context_length_exceeded")  # fmt: skip
    max_tokens, param = req.max_tokens, "max_tokens"
    if getattr(req, "max_completion_tokens", None) is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    elif max_tokens > room:
        raise APIError(400, f"{param}={max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds the "
                       f"model's context of {max_model_len} tokens: ask for at most {room}",
                       param=param, code="context_length_exceeded")  # fmt: skip
    try:
        stop = () if req.stop is None else req.stop  # "" is refused there, not dropped
        return SamplingParams(
            temperature=float(req.temperature), top_p=float(req.top_p), seed=req.seed, max_tokens=max_tokens,
            stop=stop, chunk_reuse=chunk_reuse(req), n=req.n, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, logit_bias=logit_bias(req.logit_bias),
            top_k=-1 if req.top_k is None else req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            ignore_eos=req.ignore_eos, stop_token_ids=req.stop_token_ids, min_tokens=req.min_tokens,
            **logprobs_fields(req),
        )  # fmt: skip
    except InvalidSamplingParams as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0], code="invalid_value") from None


def logit_bias(bias: dict | None) -> dict[int, float]:
    """OpenAI's logit_bias has token ids as JSON keys (strings)."""
    try:
        return {int(k): v for k, v in (bias or {}).items()}
    except ValueError:
        bad = next(k for k in bias if not k.lstrip("-").isdigit())
        raise APIError(400, f"logit_bias keys must be token ids, got {bad!r}", param="logit_bias",
                       code="invalid_value") from None  # fmt: skip


def logprobs_fields(req) -> dict:
    """Completions: `logprobs: N` (with echo, the prompt's too). Chat: `logprobs: true`, `top_logprobs: N`."""
    if isinstance(req.logprobs, bool):  # chat
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return {"logprobs": (req.top_logprobs or 0) if req.logprobs else None}
    return {"logprobs": req.logprobs, "prompt_logprobs": req.logprobs if req.echo else None}


def bound_chunks(reuse: ChunkReuse, max_chunks: int, min_tokens: int) -> None:
    """Each chunk not found in the cache costs a forward of its own: bound their number and size."""
    if len(reuse.chunks) > max_chunks:
        raise APIError(400, f"{len(reuse.chunks)} chunks; a request may reuse at most {max_chunks}: merge adjacent "
                       "ones or send fewer documents", param="raymoe_chunks", code="invalid_value")  # fmt: skip
    short = next((i for i, c in enumerate(reuse.chunks) if len(c) < min_tokens), None)
    if short is not None:
        raise APIError(400, f"chunk {short} has {len(reuse.chunks[short])} tokens; chunks need at least {min_tokens} "
                       "(shorter spans are cheaper to compute as plain prompt)", param="raymoe_chunks",
                       code="invalid_value")  # fmt: skip


def chunk_reuse(req) -> ChunkReuse | None:
    """The raymoe_chunks / raymoe_chunk_share extension fields as a ChunkReuse (None: not asked)."""
    chunks, share = getattr(req, "raymoe_chunks", None), getattr(req, "raymoe_chunk_share", None)
    if chunks is None:
        if share is not None:
            raise APIError(400, "raymoe_chunk_share needs raymoe_chunks: the prompt's reusable token spans",
                           param="raymoe_chunk_share", code="invalid_value")  # fmt: skip
        return None
    share = DEFAULT_SHARE if share is None else None if share == "adaptive" else share
    try:
        return ChunkReuse(chunks, share)
    except InvalidRequestError as e:
        param = "raymoe_chunk_share" if "share" in str(e) else "raymoe_chunks"
        raise APIError(400, str(e), param=param, code="invalid_value") from None
