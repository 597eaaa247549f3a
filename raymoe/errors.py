"""Typed errors raised for bad input from users, checkpoints, config or the cluster.

Every message says what is wrong and what to do about it. Internal invariants use ``assert``.
"""


class RaymoeError(Exception):
    """Base of every error raymoe raises on purpose."""


class CheckpointError(RaymoeError):
    """A checkpoint folder is missing, incomplete or corrupt."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is not one raymoe implements."""


class ConfigError(RaymoeError, ValueError):
    """A raymoe or model configuration value is invalid."""


class InvalidSamplingParams(RaymoeError, ValueError):
    """Sampling parameters outside their valid range."""


class PromptTooLongError(RaymoeError, ValueError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class InvalidRequestError(RaymoeError, ValueError):
    """A request the engine cannot take: empty prompt, token ids outside the vocabulary, reused id."""


class OverloadedError(RaymoeError):
    """The server's bounded queues are full; the request was not accepted and may be retried."""


class UnsupportedOperationError(RaymoeError):
    """An operation the running backend does not offer (e.g. scaling in single-engine mode)."""
