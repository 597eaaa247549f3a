"""The speculative decoding methods a config may name (no torch here: the CLI and config read it)."""

from __future__ import annotations

from typing import Literal, get_args

from raymoe.errors import ConfigError

SpeculativeName = Literal["none", "token_recycling", "prompt_lookup"]
SPECULATIVE_NAMES: tuple[str, ...] = get_args(SpeculativeName)


def check_speculative(name) -> str:
    """The name if it is a speculative method raymoe knows, else a ConfigError saying which are."""
    if name not in SPECULATIVE_NAMES:
        raise ConfigError(f"speculative must be one of {list(SPECULATIVE_NAMES)}, got {name!r}")
    return name
