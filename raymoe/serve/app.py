"""Building and running the Ray Serve application.

    app = build_app(config)                      # a bound Serve Application
    serve_forever(config, address=None)          # what `raymoe serve` does

KubeRay's `serveConfigV2` points at `raymoe.serve.app:app_builder` with
`args: {config_path: /etc/raymoe/config.yaml}` (the same YAML `raymoe serve --config` reads).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from raymoe.config import DeploymentSettings, RaymoeConfig, load_config, parse_config
from raymoe.errors import ConfigError
from raymoe.serve.resources import ResourcesUnavailableError, asks, check_fits, sized_config

logger = logging.getLogger(__name__)
APP_NAME = "raymoe"
HEALTH_APP = "raymoe-health"  # raymoe.serve.health
READY_TIMEOUT_S = 300
# Ray Serve's own settings that cut its CPU per streamed message (most of RAY_SERVE_THROUGHPUT_OPTIMIZED,
# less direct ingress, which moves the HTTP port): handle calls over gRPC instead of Ray actor tasks,
# user code and the router on the replica's main event loop (no cross-thread hand-off per message),
# request-path logs buffered. At 32 streams they took the CPU spent outside the engine per output token
# from ~0.9 to ~0.6 ms (docs/benchmarks.md). Set in raymoe's own local cluster (every Serve process
# inherits them); on a cluster of your own, set them in its environment (docker/Dockerfile does). An
# explicit value wins.
SERVE_FAST_PATH = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def resolve_model(config: RaymoeConfig) -> tuple[str, str]:
    """(model folder, name /v1/models shows)."""
    from raymoe.model.builtin import BUILTIN_MODEL_NAME, builtin_model_path

    if config.model is None:
        return str(builtin_model_path()), config.serve.model_name or BUILTIN_MODEL_NAME
    path = Path(config.model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder {path} has no config.json; pass a Hugging Face checkpoint folder")
    return str(path), config.serve.model_name or path.name


def deployment_options(settings: DeploymentSettings, autoscaling: dict | None = None) -> dict:
    """Serve options from a deployment's settings (`autoscaling`: a ready autoscaling_config)."""
    auto = settings.autoscaling
    actor = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
    if settings.resources:
        actor["resources"] = dict(settings.resources)
    return {
        "ray_actor_options": actor,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "health_check_period_s": settings.health_check_period_s,
        "autoscaling_config": autoscaling or {
            "min_replicas": auto.min_replicas,
            "initial_replicas": max(auto.min_replicas, 1),
            "max_replicas": auto.max_replicas,
            "target_ongoing_requests": auto.target_ongoing_requests,
        },
    }


def build_app(config: RaymoeConfig):
    from raymoe.serve.ingress import Ingress

    if config.ingress_in_engine and config.ingress != DeploymentSettings():
        logger.warning("the ingress settings are not used: the ingress runs inside each engine replica, sized by "
                       "`decode` (set serve.ingress_in_engine: false for an ingress deployment of its own)")  # fmt: skip
    config = sized(config)
    model_path, model_name = resolve_model(config)
    data = config.model_dump()
    if config.ingress_in_engine:  # one deployment: the ingress holds the engine in its process
        return Ingress.options(name=backend_name(config), **_engine_options(config)).bind(data, model_path, model_name)
    backend = _cluster_backend(config, data, model_path) if config.backend == "cluster" else _engine_backend(
        config, data, model_path)  # fmt: skip
    return Ingress.options(**deployment_options(config.ingress)).bind(data, model_path, model_name, backend)


def _engine_backend(config: RaymoeConfig, data: dict, model_path: str):
    from raymoe.serve.backend import EngineBackend

    return EngineBackend.options(**_engine_options(config)).bind(data, model_path)


def _engine_options(config: RaymoeConfig) -> dict:
    """The engine deployment's options (`decode` settings): the backend bounds its own queue
    (max_queue_len); Serve must not hold requests in front of it."""
    opts = deployment_options(config.decode)
    opts["max_ongoing_requests"] = max(opts["max_ongoing_requests"], config.serve.max_queue_len + 8)
    return opts


def _cluster_backend(config: RaymoeConfig, data: dict, model_path: str):
    """Prefill and decode deployments, each autoscaled on its own load; a front over both.

    A worker replica owns a worker actor that reserves the deployment's resources (so the replica
    itself reserves none); the front is light: one replica, placed like the ingress."""
    from ray.serve.config import RequestRouterConfig

    from raymoe.policies.registry import REGISTRY
    from raymoe.serve.autoscale import autoscaling_config
    from raymoe.serve.cluster_backend import ClusterBackend
    from raymoe.serve.cluster_setup import NAMESPACE
    from raymoe.serve.workers import DecodeServer, PrefillServer

    workers = {}
    for name, cls in (("prefill", PrefillServer), ("decode", DecodeServer)):
        settings = getattr(config, name)
        opts = deployment_options(settings, autoscaling_config(settings.autoscaling, name))
        opts["ray_actor_options"] = {"num_cpus": 0}
        if name == "decode" and REGISTRY[config.cluster.placement_policy].is_token_placement:
            opts["request_router_config"] = RequestRouterConfig(
                request_router_class="raymoe.serve.expert_router:ExpertAffinityRouter",
                request_router_kwargs={"namespace": NAMESPACE})  # fmt: skip
        workers[name] = cls.options(**opts).bind(data, model_path)
    front = deployment_options(config.ingress)
    front["autoscaling_config"] = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1}
    front["max_ongoing_requests"] = max(front["max_ongoing_requests"], config.serve.max_queue_len + 8)
    front["ray_actor_options"] = {**front["ray_actor_options"], "num_cpus": 0}  # beside the ingress
    return ClusterBackend.options(**front).bind(data, model_path, workers["prefill"], workers["decode"])


def sized(config: RaymoeConfig) -> RaymoeConfig:
    """`config` with CPUs left null sized to the Ray cluster (raymoe.serve.resources), logged."""
    import ray

    cpus = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
    out = sized_config(config, cpus)
    logger.info("CPUs per replica: %s (the cluster has %s CPUs)", ", ".join(
        f"{a.deployment} {a.per_replica.get('CPU', 0):g}" for a in asks(out)), "unknown" if cpus is None else f"{cpus:g}")
    return out


def app_builder(args: dict):
    """Serve's application builder (serveConfigV2 `import_path`): args {config_path} or {config: {...}}."""
    config = load_config(args["config_path"]) if "config_path" in args else parse_config(args.get("config"), "args.config")
    key = os.environ.get("RAYMOE_API_KEY")  # a Kubernetes secret as an env var keeps the key out of the YAML
    if config.serve.api_key is None and key is not None:
        data = config.model_dump()
        data["serve"]["api_key"] = key
        config = parse_config(data, "config and RAYMOE_API_KEY")
    return build_app(config)


def start(config: RaymoeConfig, address: str | None = None) -> None:
    """Start (or join) Ray, start Serve on config.serve.host:port (with direct HTTP the ingress replica
    listens there: raymoe.serve.direct), deploy and wait until ready."""
    import ray
    from ray import serve

    from raymoe.serve import direct

    own_cluster = address is None and not ray.is_initialized()
    direct_http = direct.use_direct_http(config, own_cluster)
    if direct_http:
        direct.check_port_free(config.serve.host, config.serve.port)
        os.environ.update(direct.direct_env(config.serve.port))
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local cluster on loopback
        for name, value in SERVE_FAST_PATH.items():  # before Ray starts: its workers inherit them
            os.environ.setdefault(name, value)
    if not ray.is_initialized():
        # "local": always a fresh cluster of our own, never one another program left running
        handlers = _signal_handlers()
        ray.init(address=address or "local", namespace="raymoe", include_dashboard=False, log_to_driver=False)
        _set_signal_handlers(handlers)  # Ray's core worker put a SIGTERM handler that aborts (exit 134)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    try:
        check_fits(asks(sized_config(config, ray.cluster_resources().get("CPU"))), nodes)
    except ResourcesUnavailableError as e:
        if address is None:  # our own cluster: its resources are all there will be
            raise
        logger.warning("%s; waiting in case the cluster grows (an autoscaler adds nodes)", e)
    started = time.monotonic()
    logger.info("deploying the %s backend (the model loads in the replicas; their logs: %s/logs/serve)",
                config.backend, _session_dir())  # fmt: skip
    proxy_port = direct.free_port(config.serve.host) if direct_http else config.serve.port  # direct: unused
    serve.start(http_options={"host": config.serve.host, "port": proxy_port})
    from raymoe.serve import drain

    drain.clear()
    if not direct_http:  # direct: each ingress replica is an HTTP server of its own, /health its route
        serve.run(build_health_app(config), name=HEALTH_APP, route_prefix="/health", blocking=False)  # 503 until up
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    for name in (APP_NAME,) if direct_http else (HEALTH_APP, APP_NAME):
        _wait_ready(name, READY_TIMEOUT_S)
    logger.info("ready in %.0f s", time.monotonic() - started)


def _session_dir() -> str:
    """This Ray session's folder (its logs/ holds every worker's and replica's log)."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_session_dir_path()
    except Exception:  # a private API: fall back to Ray's default link
        return "/tmp/ray/session_latest"


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in SIGNALS}


def _set_signal_handlers(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def build_health_app(config: RaymoeConfig):
    """/health on its own (raymoe.serve.health): it answers while the ingress is saturated."""
    from raymoe.serve.health import Health

    return Health.bind(APP_NAME, backend_name(config), resolve_model(config)[1], config.ingress_in_engine)


def backend_name(config: RaymoeConfig) -> str:
    """The deployment the ingress sends generation to (see build_app); with serve.ingress_in_engine
    the ingress itself, named so."""
    return "cluster" if config.backend == "cluster" else "engine"


def _wait_ready(name: str, timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise ConfigError(f"the Serve application failed to deploy: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"the Serve application was not ready after {timeout_s}s")


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
        if ray.is_initialized():
            from raymoe.serve.cluster_setup import shutdown_cluster

            shutdown_cluster()  # the detached controller, shards and KV pools of backend: cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()


def serve_forever(config: RaymoeConfig, address: str | None = None) -> None:
    """`raymoe serve`: run until SIGTERM (how Kubernetes stops a pod) or SIGINT (Ctrl-C), then drain:
    no new requests, running ones finish for up to serve.shutdown_grace_s (a second signal cuts the
    wait short), then Serve and the Ray cluster raymoe started stop."""
    received: list[int] = []
    previous = _signal_handlers()
    _set_signal_handlers({sig: lambda sig, _frame: received.append(sig) for sig in SIGNALS})
    try:
        start(config, address)  # a signal meanwhile is honoured once it is up
        url = f"http://{config.serve.host}:{config.serve.port}"
        print(f"raymoe: serving on {url}/v1 (Ctrl-C to stop)", flush=True)
        while not received:
            time.sleep(0.2)
        grace = config.serve.shutdown_grace_s
        print(f"raymoe: {signal.Signals(received[0]).name}: shutting down; running requests get {grace:g}s",
              flush=True)  # fmt: skip
        drain_app(backend_name(config), grace, lambda: len(received) > 1)
    finally:
        _set_signal_handlers(previous)
        stop()


def drain_app(backend: str, grace_s: float, cut_short) -> None:
    """Refuse new requests (raymoe.serve.drain), let the admitted ones finish within grace_s (or until
    cut_short() says so), then delete the apps."""
    from ray import serve

    from raymoe.serve import drain as mark

    deadline = time.monotonic() + grace_s
    mark.start_draining()
    try:
        if not mark.wait_idle(serve.get_deployment_handle(backend, APP_NAME), deadline, cut_short):
            logger.warning("raymoe: the grace period ended with requests still running; stopping them")
    except Exception as e:  # the app is broken already: nothing to wait for
        logger.warning("raymoe: could not wait for running requests: %r", e)
    running = serve.status().applications
    for name in (APP_NAME, HEALTH_APP):
        if name in running:  # with direct HTTP there is no health app
            serve.delete(name)
