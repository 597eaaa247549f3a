"""`GET /health`, answered apart from the ingress so probes get an answer while every ingress slot
is taken (slow clients, a burst): `raymoe serve` runs it as a second, tiny Serve application at
route prefix /health (Serve routes by the longest prefix). The ingress keeps the same route for
deployments with one application only (KubeRay's `app_builder`).

200 when the backend answers (with `backend: cluster`: the controller, every shard and both worker
deployments), 503 when it does not or the server is shutting down (`raymoe.serve.drain`). With
`serve.ingress_in_engine` the engine replicas are the ingress, so a call to them waits behind a
saturated ingress: there the probe asks Serve instead, which health-checks each replica (its
engine's stepping thread alive, `Ingress.check_health`), and the queue depth is not known (null).
"""

from __future__ import annotations

import asyncio

from ray import serve
from starlette.responses import JSONResponse

from raymoe.serve import ray_state
from raymoe.serve.drain import DrainMark
from raymoe.serve.protocol import APIError


def shutting_down() -> JSONResponse:
    """Load balancers stop sending; running requests still finish."""
    return APIError(503, "shutting down", "server_unavailable", code="shutting_down").response()


async def report(backend, model_name: str, draining: DrainMark) -> JSONResponse:
    if draining.is_set():
        return shutting_down()
    try:
        info = await asyncio.wait_for(backend.info.remote(), timeout=10)
        if info["backend"] == "cluster":  # controller, shards and both worker deployments
            await asyncio.wait_for(backend.health.remote(), timeout=30)
        stats = await asyncio.wait_for(backend.stats.remote(), timeout=10)
    except Exception as e:
        return APIError(503, f"not ready: {type(e).__name__}: {e}", "server_unavailable").response()
    return JSONResponse({"status": "ok", "model": model_name, "queue_depth": stats["num_admitted"]})


@serve.deployment(name="health", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Health:
    def __init__(self, app_name: str, backend_name: str, model_name: str, ingress_in_engine: bool = False):
        self.app_name, self.backend_name, self.model_name = app_name, backend_name, model_name
        self.draining = DrainMark()
        self.backend = None
        self.ingress_in_engine = ingress_in_engine

    async def __call__(self, request) -> JSONResponse:
        if self.ingress_in_engine:
            return await self._from_serve()
        if self.backend is None:  # looked up on first use: the main app may still be deploying
            self.backend = serve.get_deployment_handle(self.backend_name, self.app_name)
        return await report(self.backend, self.model_name, self.draining)

    async def _from_serve(self) -> JSONResponse:
        """200 while Serve has a running (health-checked) replica of the engine deployment."""
        if self.draining.is_set():
            return shutting_down()
        deployment = (await asyncio.to_thread(ray_state.deployments)).get(self.backend_name, {})
        if not deployment.get("running"):
            return APIError(503, f"not ready: no running replica of {self.backend_name!r}", "server_unavailable").response()
        return JSONResponse({"status": "ok", "model": self.model_name, "queue_depth": None})
