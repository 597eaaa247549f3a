"""Which request fields raymoe knows: every field is used, accepted without effect, or refused.

The request models (`openai_api.py`) declare the fields raymoe implements. Anything else in a body
is one of:
- IGNORED: accepted and without effect on the output (bookkeeping fields OpenAI clients send);
- UNSUPPORTED: an OpenAI field raymoe does not implement. A 400 names it, unless its value asks for
  nothing (`tools: []`, `response_format: {"type": "text"}`), so a client never gets silence
  where it asked for structure;
- unknown: a 400 naming every such field (a typo such as `max_token` must not pass unseen).
docs/api.md has the table of fields.
"""

from __future__ import annotations

from pydantic import BaseModel

from raymoe.serve.protocol import APIError

IGNORED = frozenset({"user", "metadata", "store", "service_tier"})


def _is_empty(value) -> bool:
    return value in (None, [], {}, False)


# name -> when its value asks for nothing (then it is accepted)
UNSUPPORTED = {
    "tools": _is_empty,
    "tool_choice": lambda v: v in (None, "none", "auto"),  # "auto" without tools asks nothing
    "functions": _is_empty,
    "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v in (None, False),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v in (None, ["text"]),
    "audio": _is_empty,
    "prediction": _is_empty,
    "web_search_options": _is_empty,
    "reasoning_effort": lambda v: v is None,
    "suffix": lambda v: v in (None, ""),
    "best_of": lambda v: v in (None, 1),
    "guided_json": _is_empty,
    "guided_regex": _is_empty,
    "guided_choice": _is_empty,
    "guided_grammar": _is_empty,
    "use_beam_search": _is_empty,
}


def check_fields(req: BaseModel) -> None:
    """400 for fields raymoe does not implement (with a value that asks for something), then for
    unknown ones; both messages name every such field."""
    extra = req.model_extra or {}
    unsupported = sorted(k for k, v in extra.items() if k in UNSUPPORTED and not UNSUPPORTED[k](v))
    if unsupported:
        raise APIError(400, f"{', '.join(unsupported)}: not supported by raymoe (see docs/api.md for the fields "
                       "it implements); leave them out", param=unsupported[0], code="unsupported_parameter")  # fmt: skip
    unknown = sorted(k for k in extra if k not in UNSUPPORTED and k not in IGNORED)
    if unknown:
        raise APIError(400, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not a field of "
                       "this endpoint (check the spelling; docs/api.md lists the fields)", param=unknown[0],
                       code="unknown_parameter")  # fmt: skip
