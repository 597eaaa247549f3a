"""raymoe: elastic Mixture-of-Experts serving on Ray.

Public API: ``raymoe.LLM``, ``raymoe.SamplingParams`` and the ``raymoe`` command line.
"""

from raymoe.errors import (
    CheckpointError,
    ConfigError,
    InvalidSamplingParams,
    PromptTooLongError,
    RaymoeError,
    UnsupportedArchitectureError,
)

__all__ = [
    "LLM",
    "SamplingParams",
    "CheckpointError",
    "ConfigError",
    "InvalidSamplingParams",
    "PromptTooLongError",
    "RaymoeError",
    "UnsupportedArchitectureError",
]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import raymoe.policies` does not import torch.
    if name == "LLM":
        from raymoe.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from raymoe.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
