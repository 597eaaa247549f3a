"""What crosses from the front to a prefill worker and from a prefill to a decode worker:
token ids and small metadata only; the KV itself moves through the KV pool by content key, or
straight from the prefill worker (`kv_transport` gloo / nccl: `raymoe.cluster.kv_direct`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raymoe.engine.sampling_params import SamplingParams


@dataclass
class WorkRequest:
    """A request for a worker; `output_token_ids` are tokens already produced (a resume)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    kv_node_id: str | None = None  # node whose KV pool holds this request's prompt blocks
    routing: object = None  # numpy [moe layers, experts]: its routing seen so far (decode router's seat)
    kv_tail: bool = False  # released by a decode worker: its partial block's KV is pooled too


@dataclass
class Handoff:
    """A prefill's result: the first generated token, or the request finished already."""

    request_id: str
    first_token: int
    finish_reason: str | None  # "stop" | "length" when the first token ends it
    num_prefix_hit_tokens: int  # prompt tokens whose KV came from a cache (not computed)
    kv_node_id: str | None = None  # node whose KV pool holds the prompt's blocks
    routing: object = None  # numpy [moe layers, experts]: the prompt's token-expert pairs (seating)
    logprobs: list | None = None  # [Entry] of the first token, when params.logprobs asks
    prompt_logprobs: list | None = None  # [None, Entry, ...] when params.prompt_logprobs asks


@dataclass
class TokenDelta:
    """New tokens of one request since the last poll."""

    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list | None = None  # an Entry per token, when params.logprobs asks
