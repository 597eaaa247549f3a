"""Admin routes: cluster status, rebalance, scale. They always need the API key when one is set.

With the engine backend there is one process and no placement, so rebalance and scale answer 501
with a message saying which backend offers them.
"""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse
from starlette.requests import Request

from raymoe.config import RaymoeConfig
from raymoe.errors import ConfigError
from raymoe.serve.openai_api import ClusterStatus, ScaleRequest
from raymoe.serve.protocol import APIError, check_api_key

ADMIN_TIMEOUT_S = 30


class AdminRoutes:
    def __init__(self, backend, config: RaymoeConfig, model_name: str):
        self.backend, self.config, self.model_name = backend, config, model_name

    async def cluster(self, request: Request) -> JSONResponse:
        check_api_key(request, self.config.serve.api_key)
        status = await self._call(self.backend.cluster_status.remote())
        status = {**status, "model": self.model_name, "model_path": status["model"]}  # the name /v1/models shows
        return JSONResponse(ClusterStatus.model_validate(status).model_dump())

    async def rebalance(self, request: Request) -> JSONResponse:
        check_api_key(request, self.config.serve.api_key)
        self._needs_cluster("rebalance")
        epoch = await self._call(self.backend.rebalance.remote())
        return JSONResponse({"ok": True, "message": "placement applied", "placement_epoch": epoch})

    async def scale(self, req: ScaleRequest) -> JSONResponse:
        self._needs_cluster("scale")
        try:
            await self._call(self.backend.scale.remote(req.deployment, req.num_replicas))
        except ConfigError as e:
            raise APIError(400, str(e), param="num_replicas") from None
        if req.num_replicas is None:
            return JSONResponse({"ok": True, "message": f"{req.deployment} follows its autoscaler again"})
        return JSONResponse({"ok": True, "message": f"{req.deployment} scaling to {req.num_replicas} replicas"})

    def _needs_cluster(self, what: str) -> None:
        if self.config.backend != "cluster":
            raise APIError(501, f"{what} is not available with the engine backend (one process holds every expert); "
                           "start the server with `backend: cluster` in its config", "not_implemented",
                           code="unsupported_backend")  # fmt: skip

    async def _call(self, response):
        try:
            return await asyncio.wait_for(response, timeout=ADMIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"the backend did not answer within {ADMIN_TIMEOUT_S}s; retry", "server_unavailable",
                           headers={"Retry-After": "5"}) from None  # fmt: skip
