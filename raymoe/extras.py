"""Optional dependencies: which pip extra of raymoe brings each one (pyproject.toml)."""

from __future__ import annotations

EXTRA_OF_MODULE = {
    "ray": "serve",
    "fastapi": "serve",
    "starlette": "serve",
    "prometheus_client": "serve",
    "cupy": "gpu",
    "matplotlib": "bench",
    "transformers": "bench",
}


def missing_extra_message(error: ModuleNotFoundError) -> str | None:
    """One line naming the extra that installs the missing module; None if no extra has it."""
    module = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return (f"the Python package {module!r} is missing; it comes with raymoe's '{extra}' extra: "
            f"pip install -c constraints.txt -e '.[{extra}]' in a clone, or pip install 'raymoe[{extra}]'")
