"""OpenAI-compatible request and response bodies (pydantic), shared by the server and the SDK.

Requests forbid nothing extra (OpenAI clients send fields raymoe ignores, such as `user`), but the
fields raymoe uses are strictly typed: a string where a number belongs is a 400, not a coercion.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat
MAX_N = 16  # choices per request at most
MAX_LOGPROBS = 20  # top logprobs per token at most (= raymoe.engine.sampling_params.MAX_LOGPROBS)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)  # samples of the prompt: one choice each
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[StrictStr, Number] | None = None  # token id (as a JSON key) -> bias in [-100, 100]
    # vLLM's extensions (its clients and benchmark send them)
    top_k: StrictInt | None = None
    min_p: Number = 0.0
    repetition_penalty: Number = 1.0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    min_tokens: StrictInt = 0
    # raymoe extension, chunk-cache reuse (docs/chunks.md): token-id spans of the prompt (documents)
    # whose KV is reused wherever they sit; a share of their tokens is recomputed ("adaptive": chosen).
    raymoe_chunks: list[list[StrictInt]] | None = None
    raymoe_chunk_share: Number | Literal["adaptive"] | None = None


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top-N per token (echo: the prompt's too)
    # raymoe extension: documents placed before the prompt, each a reusable chunk (docs/chunks.md)
    raymoe_documents: list[StrictStr] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # needs logprobs: true


# ----- responses ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "raymoe"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# ----- admin -------------------------------------------------------------------------------------
class ClusterStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    backend: str
    model: str
    nodes: list[dict[str, Any]] = []
    workers: list[dict[str, Any]] = []
    placement_epoch: int | None = None
    expert_load: list[list[float]] | None = None  # [layers, experts] token counts, recent window


class ScaleRequest(BaseModel):
    deployment: Literal["prefill", "decode"]
    num_replicas: StrictInt | None = Field(ge=0)  # None: hand the count back to the autoscaler


class AdminResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    ok: bool
    message: str = ""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
