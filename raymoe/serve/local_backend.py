"""The engine in the ingress's own process (`serve.ingress_in_engine`), behind the calls the ingress
makes on a deployment handle.

With `backend: engine` each chunk of deltas otherwise crosses two Ray processes (engine replica ->
ingress replica -> HTTP proxy), about 8 per engine step. With the switch on, one deployment is both:
its ingress holds a `LocalEngine`, and a step's chunks go from the engine (its process or thread)
to the replica's own event loop, then to the client. `LocalBackend` answers what the ingress asks of a handle,

    stream = backend.options(stream=True).generate.remote(request_id, prompt_ids, params)
    first = await stream.__anext__(); async for deltas in stream: ...; stream.cancel()
    info = await backend.info.remote()          # likewise stats, cluster_status, rebalance

so the ingress's request handling is one code path for both arrangements.
"""

from __future__ import annotations

import asyncio
import inspect

_closing: set[asyncio.Task] = set()  # cancelled streams being closed (a task needs a reference)


class LocalBackend:
    """`target`'s methods as a deployment handle offers them: `.remote(...)` gives an awaitable, or
    for an async generator method a `LocalStream`. Plain methods run in a thread (as Serve runs a
    replica's sync methods), so a slow one (stats reads Serve's status) never stalls the streams."""

    def __init__(self, target):
        self.target = target

    def options(self, stream: bool = False) -> LocalBackend:
        return self  # a method's kind says whether it streams

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(getattr(self.target, name))

    def check_health(self) -> None:
        """Raises if the engine's process or stepping thread died (the replica's own health check)."""
        self.target.check_health()

    def close(self) -> None:
        self.target.loop.shutdown()


def local_engine(config: dict, model_path: str) -> LocalBackend:
    """A `LocalEngine` (raymoe.serve.backend) in this process, behind handle calls."""
    from raymoe.serve.backend import LocalEngine

    return LocalBackend(LocalEngine(config, model_path))


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        if inspect.isasyncgenfunction(self.fn):
            return LocalStream(self.fn(*args, **kwargs))
        if inspect.iscoroutinefunction(self.fn):
            return self.fn(*args, **kwargs)
        return asyncio.to_thread(self.fn, *args, **kwargs)


class LocalStream:
    """An async generator as a Serve streaming response: iterate it, or `cancel()` it, which closes
    it (its `finally` aborts the request and frees its KV blocks)."""

    def __init__(self, gen):
        self.gen = gen

    def __aiter__(self) -> LocalStream:
        return self

    def __anext__(self):
        return self.gen.__anext__()

    def cancel(self) -> None:
        task = asyncio.ensure_future(self.gen.aclose())  # after the current await: never while it runs
        _closing.add(task)
        task.add_done_callback(_closing.discard)
