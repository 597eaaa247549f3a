"""raymoe's settings: one typed, frozen model, read from YAML.

The same YAML drives `raymoe serve --config FILE` and the KubeRay manifests (a ConfigMap mounted
at /etc/raymoe/config.yaml). Validated once here; values found at run time (KV blocks that fit,
EOS ids) live in the engine, never written back. Unknown keys are errors, so a typo is caught:

    model: null                 # Hugging Face MoE folder; null = the built-in model
    backend: engine             # "engine": one-process engine per replica; "cluster": MoECluster
    engine: {max_num_seqs: 32, dtype: float32}
    serve: {port: 8000, max_queue_len: 64, api_key: null, ingress_in_engine: null, direct_http: null}
    prefill: {autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymoe.engine.spec import SpeculativeName
from raymoe.errors import ConfigError
from raymoe.policies.registry import PolicyName

BackendName = Literal["engine", "cluster"]
DtypeName = Literal["float32", "bfloat16", "float16", "auto"]  # auto: bfloat16 on CUDA, float32 on CPU
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EngineSettings(_Frozen):
    """Mirrors `raymoe.engine.llm_engine.EngineConfig` (see it for why each field exists)."""

    max_num_seqs: int = Field(32, gt=0, description="running sequences at most (the decode batch size)")
    max_num_batched_tokens: int = Field(512, gt=0, description="new tokens per step; prompts chunk to fit")
    long_prefill_token_threshold: int | None = Field(None, gt=0, description="a prefill's new tokens per step at "
                                                     "most (short steps for decodes beside a long prompt); "
                                                     "null = the whole step budget")  # fmt: skip
    block_size: int = Field(16, gt=0, description="tokens per KV block: allocation and prefix-sharing unit")
    kv_cache_bytes: int = Field(256 << 20, gt=0, description="KV pool size per engine")
    dtype: DtypeName = "auto"  # auto: float32 on CPU (identical to transformers), bfloat16 on CUDA
    threads: int | None = Field(None, gt=0, description="torch intra-op threads per engine; "
                                "null = the CPUs its replica reserves (decode.num_cpus), at least 1")  # fmt: skip
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="cpu, cuda, cuda:N or auto (CUDA where the "
                        "engine's process sees a GPU); give the deployment num_gpus so Ray assigns one")  # fmt: skip
    speculative: SpeculativeName = "none"  # drafts from the request itself, verified in the decode step (lossless)
    num_speculative_tokens: int | None = Field(None, gt=0, description="draft tokens per sequence at most; "
                                               "null = the drafter's default")  # fmt: skip
    speculative_token_budget: int = Field(32, gt=0, description="tokens a step verifies (decodes + drafts); "
                                          "drafts shrink to fit as the batch grows")  # fmt: skip
    speculative_draft_cost: float = Field(0.1, gt=0, le=1, description="a draft token's cost as a share of a "
                                          "decode step; lower (deeper drafts) where steps wait on round trips")  # fmt: skip

    def to_engine_config(self):
        from raymoe.engine.llm_engine import EngineConfig

        return EngineConfig(**self.model_dump())


class AutoscalingSettings(_Frozen):
    """Ray Serve `autoscaling_config`. The engine backend's replicas follow their ongoing requests;
    with `backend: cluster`, prefill replicas follow queued prompt tokens and decode replicas follow
    running sequences and KV blocks in use (raymoe's policy, `raymoe.serve.autoscale`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(8, gt=0, description="queue depth per replica to aim for")
    target_queued_prompt_tokens: float = Field(2048, gt=0, description="prefill: prompt tokens waiting per replica")
    target_running_sequences: float = Field(16, gt=0, description="decode: sequences per replica")
    target_kv_block_fraction: float = Field(0.8, gt=0, le=1, description="decode: share of KV blocks in use")
    upscale_delay_s: float = Field(5.0, ge=0, description="a scale-up must be wanted this long")
    downscale_delay_s: float = Field(30.0, ge=0, description="a scale-down must be wanted this long")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report their load")
    look_back_period_s: float = Field(10.0, gt=0, description="load is averaged over this window")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}); "
                "raise max_replicas or lower min_replicas"
            )
        return self


class DeploymentSettings(_Frozen):
    num_cpus: float | None = Field(
        None, ge=0, description="CPUs each replica reserves; null: 0.5 for the ingress, and for prefill and decode "
        "the cluster's CPUs less the ingress's, shared by their max_replicas, at most 1 (raymoe.serve.resources)")
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description='custom Ray resources, e.g. {"raymoe_decode": 1}')
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_ongoing_requests: int = Field(256, gt=0, description="concurrent requests per replica before Serve queues")
    graceful_shutdown_timeout_s: float = Field(
        10.0, ge=0, description="a stopping replica finishes its requests this long; the rest resume elsewhere"
    )
    health_check_period_s: float = Field(5.0, gt=0, description="how often Serve checks a replica's health")


class ServeSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    # when set, /v1 and /admin need `Authorization: Bearer <key>`; `raymoe serve` also takes it from
    # --api-key-file or the RAYMOE_API_KEY environment variable (kept out of `ps`)
    api_key: str | None = None
    model_name: str | None = None  # the name /v1/models shows; None = the folder's name
    max_queue_len: int = Field(64, gt=0, description="requests admitted per backend replica; more get 503")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger request bodies get 413")
    default_max_tokens: int = Field(16, gt=0, description="max_tokens when a request leaves it out")
    retry_after_s: int = Field(1, gt=0, description="Retry-After sent with 503 when queues are full")
    body_timeout_s: float = Field(10.0, gt=0, description="a request body slower than this gets 408")
    # on SIGTERM/SIGINT: running requests get this long to finish; keep it ~10 s under Kubernetes'
    # terminationGracePeriodSeconds (30 s by default) so stopping Serve and Ray fits too
    shutdown_grace_s: float = Field(20.0, ge=0, description="running requests finish this long on SIGTERM")
    max_chunks_per_request: int = Field(32, gt=0, description="raymoe_chunks / raymoe_documents per request")
    min_chunk_tokens: int = Field(8, gt=0, description="shorter raymoe_chunks get 400 (each costs a forward)")
    ingress_in_engine: bool | None = Field(None, description="backend: engine only: the HTTP ingress runs inside "
                                           "each engine replica (one deployment, sized by `decode`), so streamed "
                                           "tokens skip a hop between Ray processes (raymoe.serve.local_backend); "
                                           "null: on with backend: engine, off with backend: cluster")  # fmt: skip
    engine_process: bool = Field(True, description="backend: engine: the engine steps in a child process of its "
                                 "replica (as vLLM's engine core), so the replica's HTTP work does not hold the GIL "
                                 "its steps need (raymoe.serve.engine_process); false: a thread in the replica")  # fmt: skip
    direct_http: bool | None = Field(None, description="the ingress replica listens on `port` itself (Ray Serve's "
                                     "direct ingress): no HTTP proxy process in between (raymoe.serve.direct); "
                                     "null: on when `raymoe serve` starts its own Ray and the ingress deployment "
                                     "has one replica")  # fmt: skip

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, key: str | None) -> str | None:
        if key is not None and (not key.strip() or key != key.strip()):
            raise ValueError(
                "the API key is empty or has surrounding whitespace; set a real key (--api-key, --api-key-file, "
                "RAYMOE_API_KEY) or leave it unset (null) to serve without one"
            )
        return key


class ClusterSettings(_Frozen):
    """For `backend: cluster` (see `raymoe.cluster.cluster.ClusterConfig`)."""

    shards_per_node: int = Field(1, gt=0)
    replicas: int = Field(1, gt=0, description="copies of every expert; >1 routes around a dead shard")
    num_microbatches: int = Field(1, gt=0)
    colocate_experts: bool = Field(True, description="workers run the experts placed on their own node in process")
    kv_pool_bytes: int = Field(256 << 20, gt=0, description="KV pool per node")
    placement_policy: PolicyName = "replication"
    rebalance_interval_s: float = Field(60.0, gt=0)
    node_watch_s: float | None = Field(2.0, gt=0, description="how often the controller reads Ray's node table")
    shard_num_gpus: float = Field(0.0, ge=0, description="GPU share each expert shard reserves (engine.device "
                                  "cuda: shards compute there; fractional lets shards share a GPU with workers)")  # fmt: skip
    transport: Literal["actor_call", "nccl"] = Field(
        "actor_call", description="decode workers' expert rows to shards: Ray actor calls, or NCCL between GPUs "
        "(pip install 'raymoe[gpu]'; needs shard_num_gpus > 0)")  # fmt: skip

    @model_validator(mode="after")
    def _nccl_needs_gpus(self):
        if self.transport == "nccl" and not self.shard_num_gpus > 0:
            raise ValueError("transport 'nccl' moves rows between GPUs: set shard_num_gpus > 0 or use 'actor_call'")
        return self


class RaymoeConfig(_Frozen):
    model: str | None = None  # Hugging Face MoE checkpoint folder; None = the built-in model
    backend: BackendName = "engine"
    engine: EngineSettings = Field(default_factory=EngineSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    ingress: DeploymentSettings = Field(default_factory=DeploymentSettings)
    prefill: DeploymentSettings = Field(default_factory=DeploymentSettings)
    decode: DeploymentSettings = Field(default_factory=DeploymentSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @property
    def ingress_in_engine(self) -> bool:
        """serve.ingress_in_engine, resolved: null means on exactly when the backend is the engine."""
        explicit = self.serve.ingress_in_engine
        return self.backend == "engine" if explicit is None else explicit

    @property
    def ingress_section(self) -> str:
        """The section sizing the deployment that holds the HTTP ingress: `decode` with the ingress
        inside the engine replica, else `ingress`."""
        return "decode" if self.ingress_in_engine else "ingress"

    @model_validator(mode="after")
    def _inline_needs_engine(self):
        if self.serve.ingress_in_engine and self.backend != "engine":
            raise ValueError("serve.ingress_in_engine runs the ingress inside the engine replica, which only "
                             "backend: engine has; set serve.ingress_in_engine: false or backend: engine")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _direct_needs_one_ingress(self):
        where = self.ingress_section
        settings = getattr(self, where)
        if self.serve.direct_http and settings.autoscaling.max_replicas > 1:
            raise ValueError(f"serve.direct_http serves serve.port from the one ingress replica; {where} may have "
                             f"{settings.autoscaling.max_replicas} (each would get a port of its own): set "
                             f"{where}.autoscaling.max_replicas: 1 or serve.direct_http: false")  # fmt: skip
        return self


def parse_config(data: dict[str, Any] | None, source: str = "config") -> RaymoeConfig:
    """Validate a dict (parsed YAML); raise ConfigError listing every bad field and how to fix it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, got {type(data).__name__}")
    try:
        return RaymoeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source} is invalid:\n{_explain(e)}") from None


def load_config(path: str | Path | None) -> RaymoeConfig:
    """Read and validate a YAML file; None gives the defaults."""
    if path is None:
        return RaymoeConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a raymoe YAML config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_config(data, str(path))


def _explain(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if not err["loc"]:  # a check across sections: its input is the whole config (the API key too)
            lines.append(f"  {err['msg']}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown setting; remove it or check its spelling")
        elif err["type"] == "literal_error":
            lines.append(f"  {where}: {err['msg']}, got {err.get('input')!r}")
        elif where.endswith("api_key"):  # never echo a secret
            lines.append(f"  {where}: {err['msg']}")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r}); fix this value")
    return "\n".join(lines)
