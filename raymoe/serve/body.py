"""Reading a request body: bounded in size and in time, decoded as strict JSON, then validated.

Strict JSON refuses what Python's `json` module lets through but no client should send, each as a
400 that names the problem (and where it is, when a field holds it):
- `NaN`, `Infinity` (not JSON) and numbers that overflow to infinity (`1e999`);
- integers longer than MAX_INT_DIGITS digits (no field takes one; Python refuses 4,300+ anyway);
- lone UTF-16 surrogates (`"\\ud800"`): not Unicode text, tokenizers cannot take them;
- nesting deeper than MAX_DEPTH (the decoder itself fails near 1,000 levels).
A body that does not arrive within the deadline is a 408, so a stalled client frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import math

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from raymoe.serve.protocol import APIError

MAX_DEPTH = 32  # chat bodies with content parts nest about 6 deep
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: seeds and token ids fit


class _BadNumber(Exception):
    pass


async def parse_body(request: Request, model: type[BaseModel], max_bytes: int, timeout_s: float) -> BaseModel:
    """Read (within timeout_s), size-check, JSON-decode (strict) and validate a request body."""
    data = decode_json(await read_body(request, max_bytes, timeout_s))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p)) or None
        hint = "this field is required" if err["type"] == "missing" else err["msg"]
        raise APIError(400, f"{param}: {hint}", param=param, code="invalid_value") from None


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    try:
        return await asyncio.wait_for(_read(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g}s; send the whole body at once",
                       code="request_timeout") from None  # fmt: skip


async def _read(request: Request, max_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(len(body), max_bytes)
    return bytes(body)


def decode_json(body: bytes) -> dict:
    """The body as a JSON object, strictly (see the module docstring)."""
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except _BadNumber as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels; send a flatter body",
                       code="invalid_json") from None  # fmt: skip
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    _check_values(data)
    return data


def _no_constant(name: str):
    raise _BadNumber(f"{name} is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"the number {text[:40]} is out of range; send a finite number")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _BadNumber(f"an integer of {digits} digits; integers here have at most {MAX_INT_DIGITS}")
    return int(text)


def _check_values(data: dict) -> None:
    """Depth and text checks over the decoded body, iteratively (no recursion to exhaust)."""
    stack: list[tuple[object, tuple, int]] = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels; send a flatter body",
                           param=_param(path), code="invalid_json")  # fmt: skip
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, (*path, key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, (*path, i), depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: tuple) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        raise APIError(400, f"{_param(path) or 'the body'}: a lone UTF-16 surrogate (\\u{ord(char):04x}) at "
                       f"character {e.start} is not Unicode text; send valid UTF-8",
                       param=_param(path), code="invalid_value") from None  # fmt: skip


def _param(path: tuple) -> str | None:
    return ".".join(str(p) for p in path) or None


def _too_large(num_bytes: int, max_bytes: int) -> APIError:
    return APIError(413, f"the request body is {num_bytes}+ bytes; the limit is {max_bytes}: send a shorter prompt",
                    code="request_too_large")  # fmt: skip


def _is_type_tag(loc_part) -> bool:
    """pydantic names the union member in an error's location (`prompt.str`); clients want `prompt`."""
    return isinstance(loc_part, str) and (loc_part in {"str", "int", "float", "bool", "list", "dict"}
                                          or "[" in loc_part)  # fmt: skip
