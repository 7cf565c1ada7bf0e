"""The one typed configuration: local runs, the Ray Serve config and the Helm chart's
serveConfigV2 are all rendered from a `ClusterConfig`.

Validation refuses configurations that cannot run, with the arithmetic in the message,
so a platform team learns at `cluster plan` time, not after a 20-minute weight load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.architecture import MISTRAL_LARGE_2, ModelArchitecture
from cluster.memory import GiB, MemoryPlan, plan_replica

SERVED_MODEL_NAME = "mistral-large-2411"
# router.policy values that install one of Ray's own request routers instead of ours:
# Serve's default (power of two choices), Ray Serve LLM's PrefixCacheAffinityRouter
# (a character prefix tree) and Ray 2.60's KVAwareRouter (Dynamo's selection service
# fed by the engines' KV events). deployments.app maps them to router classes.
RAY_DEFAULT_POLICY = "ray-default"
RAY_PREFIX_AWARE_POLICY = "ray-prefix-aware"
RAY_KV_AWARE_POLICY = "ray-kv-aware"
RAY_POLICIES = (RAY_DEFAULT_POLICY, RAY_PREFIX_AWARE_POLICY, RAY_KV_AWARE_POLICY)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Object stores an engine can stream `model.source` from (vLLM's runai_streamer loader reads
# s3:// and gs://; az:// too, but the chart has no credentials wiring for it).
OBJECT_STORE_SCHEMES = ("s3://", "gs://")


def is_object_store_uri(source: str) -> bool:
    return "://" in source


class ObjectStoreAccess(_Strict):
    """How the engines reach an object-store `model.source` (s3:// or gs://): vLLM's
    runai_streamer loader reads the safetensors straight from the bucket (and pulls the
    config and tokenizer files into its cache), so no volume holds the weights.

    Credentials (runai-model-streamer docs/src/usage.md): the Secret's keys
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN become the
    engines' environment; for gs:// those are the bucket's HMAC interoperability keys (the
    endpoint defaults to https://storage.googleapis.com). No Secret: the ambient identity
    (IRSA or instance role through boto3 for s3://, the metadata server / workload identity
    for gs://)."""

    credentials_secret: str | None = None
    # An S3-compatible endpoint (MinIO, Ceph, GCS interop): AWS_ENDPOINT_URL, and path-style
    # addressing (RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0), which such stores need.
    endpoint_url: str | None = Field(None, pattern=r"^https?://.+")
    region: str | None = None

    def engine_env(self, source: str) -> dict[str, str]:
        """The engines' non-secret streamer environment for `source` (the chart adds the
        Secret's keys to the engine pods)."""
        env: dict[str, str] = {}
        endpoint = self.endpoint_url
        if endpoint is None and source.startswith("gs://") and self.credentials_secret:
            endpoint = "https://storage.googleapis.com"  # HMAC keys go through the S3 API
        if endpoint is not None:
            env["AWS_ENDPOINT_URL"] = endpoint
            env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] = "0"
            # Else the AWS SDK first asks the EC2 metadata server and waits seconds for it.
            env["AWS_EC2_METADATA_DISABLED"] = "true"
        if self.region is not None:
            env["AWS_REGION"] = self.region
        return env


class ModelConfig(_Strict):
    served_name: str = SERVED_MODEL_NAME
    # Local path, object-store URI (s3://, gs://; the pools must stream their weights, see
    # ObjectStoreAccess) or "embedded:tiny" for the generated default.
    source: str = "/models/Mistral-Large-Instruct-2411"
    object_store: ObjectStoreAccess = Field(default_factory=ObjectStoreAccess)
    architecture: ModelArchitecture = MISTRAL_LARGE_2
    weight_dtype: Literal["bfloat16", "fp8"] = "bfloat16"
    # Mistral's own formats: consolidated safetensors, params.json and the v7 tekken/SPM tokenizer.
    tokenizer_mode: Literal["mistral", "auto"] = "mistral"
    config_format: Literal["mistral", "hf", "auto"] = "mistral"
    load_format: Literal["mistral", "safetensors", "auto"] = "mistral"
    tool_call_parser: str = "mistral"
    # The checkpoint's tokenizer file, where the gateway cannot find it from `source`
    # (e.g. an object-store URI); see cluster.tokenizer.tokenizer_file_for.
    tokenizer_file: str | None = None

    @model_validator(mode="after")
    def _object_store(self) -> ModelConfig:
        if is_object_store_uri(self.source):
            if not self.source.startswith(OBJECT_STORE_SCHEMES):
                raise ValueError(
                    f"model.source {self.source!r}: only {' and '.join(OBJECT_STORE_SCHEMES)} object stores "
                    "are supported (vLLM's runai_streamer reads them; the chart passes their credentials)"
                )
            if self.source.rstrip("/").count("/") < 3:
                raise ValueError(
                    f"model.source {self.source!r} must name the checkpoint folder: scheme://bucket/folder"
                )
        elif self.object_store != ObjectStoreAccess():
            raise ValueError(
                f"model.object_store is set but model.source {self.source!r} is not an object-store URI "
                f"({' or '.join(OBJECT_STORE_SCHEMES)})"
            )
        if self.tokenizer_file is not None and is_object_store_uri(self.tokenizer_file):
            raise ValueError(
                f"model.tokenizer_file {self.tokenizer_file!r} must be a local file: the gateway reads it "
                "at start (for Mistral-Large-Instruct-2411 leave it unset: the bundled v7 file is used)"
            )
        return self


class WeightStreamingConfig(_Strict):
    """Read the weights with vLLM's Run:ai model streamer (`load_format: runai_streamer`):
    tensors are read by a pool of threads and handed to the engine as they arrive, from a
    local folder or straight from an object store (s3://, gs://, az://), instead of one
    file after another. Needs the `runai-model-streamer` package (with its s3/gcs extra
    for object stores). It reads every `*.safetensors` file of the model folder: the folder
    must hold one checkpoint format only (the chart's object-store fetch downloads one;
    a Mistral repository copied whole holds both consolidated and Hugging Face shards)."""

    enabled: bool = False
    # Parallel reads (RUNAI_STREAMER_CONCURRENCY; vLLM's default 16). Object stores want more.
    concurrency: int | None = Field(None, ge=1)
    # CPU staging buffer in bytes (RUNAI_STREAMER_MEMORY_LIMIT; -1: unlimited).
    memory_limit_bytes: int | None = Field(None, ge=-1)
    # Each tensor-parallel rank streams only its own shards (vLLM's distributed streaming).
    distributed: bool = False

    def loader_extra_config(self) -> dict[str, Any]:
        """vLLM's `model_loader_extra_config` for the runai_streamer loader."""
        extra: dict[str, Any] = {}
        if self.concurrency is not None:
            extra["concurrency"] = self.concurrency
        if self.memory_limit_bytes is not None:
            extra["memory_limit"] = self.memory_limit_bytes
        if self.distributed:
            extra["distributed"] = True
        return extra


class CompileCacheConfig(_Strict):
    """A persistent torch.compile cache: vLLM keeps its compiled graphs (and the inductor
    kernels, under `<dir>/torch_compile_cache/<hash>/`) in VLLM_CACHE_ROOT, keyed by model,
    engine config and versions; an engine finding its entry skips the compilation. The
    default root is in the container's home and dies with the pod; a cache on a volume
    that outlives the pod makes every later start on it a warm one."""

    enabled: bool = False
    dir: str = "/var/cache/vllm"  # VLLM_CACHE_ROOT inside the engine (the chart mounts here)
    # The chart's volume: "node": a hostPath on each node (<nodeCache.path>/vllm, or
    # host_path); "pvc": one claim every pod of the pool mounts (ReadWriteMany; entries
    # are per config hash, so pods may share it); "pod": an emptyDir (container restarts only).
    volume: Literal["node", "pvc", "pod"] = "node"
    host_path: str | None = None
    claim_name: str | None = None

    @model_validator(mode="after")
    def _volume(self) -> CompileCacheConfig:
        if self.enabled and self.volume == "pvc" and not self.claim_name:
            raise ValueError("compile_cache.volume 'pvc' needs compile_cache.claim_name")
        if not self.dir.startswith("/"):
            raise ValueError(f"compile_cache.dir must be an absolute path, got {self.dir!r}")
        return self


class EngineArgs(_Strict):
    """The vLLM engine arguments we set deliberately; `extra` passes anything else through."""

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=16)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    quantization: Literal["fp8"] | None = None
    block_size: int = Field(16, ge=1)
    enforce_eager: bool = False
    dtype: Literal["bfloat16", "float16", "auto"] = "bfloat16"
    # Reserve per device for activations, CUDA graphs and NCCL buffers (vLLM profiles it;
    # this is the planning estimate).
    reserve_gib_per_device: float = Field(4.0, ge=0.0)
    # CPU backend only: fixed KV cache size (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_space_gib: int = Field(1, ge=1)
    # Serve's per-replica cap; None: 4 x max_num_seqs (at least 64). Engines queue in
    # vLLM's own scheduler, so this only guards runaway load.
    max_ongoing_requests: int | None = Field(None, ge=1)
    # Faster cold start: streamed weight loading and a persistent compile cache.
    stream_weights: WeightStreamingConfig = Field(default_factory=WeightStreamingConfig)
    compile_cache: CompileCacheConfig = Field(default_factory=CompileCacheConfig)
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def serve_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or max(self.max_num_seqs * 4, 64)

    def kv_dtype(self) -> str:
        """Storage type of the KV cache: fp8 when asked for, else the activation dtype."""
        if self.kv_cache_dtype.startswith("fp8"):
            return "fp8"
        return "bfloat16" if self.dtype == "auto" else self.dtype


AutoscalingPolicyName = Literal["ongoing-requests", "queue-kv", "slo"]


class QueueKVPolicyConfig(_Strict):
    """Parameters of autoscaling/queue_kv_policy.py."""

    target_waiting_per_replica: float = Field(4.0, gt=0)
    target_kv_usage: float = Field(0.85, gt=0, le=1)
    kv_hold: float = Field(0.5, ge=0, le=1)


class SLOPolicyConfig(_Strict):
    """Parameters of autoscaling/slo_policy.py: scale on measured queue wait against a
    target, and ahead of a rising arrival rate by the pool's cold start."""

    # Mean time a request waits in an engine's queue before its prefill starts. Waiting is
    # the part of TTFT more replicas remove; the prefill itself is not.
    target_queue_wait_s: float = Field(0.5, gt=0)
    # Scale down only while the measured wait is below this fraction of the target.
    scale_down_below: float = Field(0.25, ge=0, lt=1)
    # Arrival-rate trend over this window, projected over the cold start.
    trend_window_s: float = Field(120.0, gt=0)
    # None: the pool's estimated cold start (ColdStartConfig), the time a replica asked
    # for now needs before it serves.
    lead_s: float | None = Field(None, ge=0)


class ColdStartConfig(_Strict):
    """How long a new engine replica takes to serve: the simulator and the SLO policy's
    lead time use it. Defaults reproduce Ray's deployment-initialization guide figure for
    a 70B model on TP=4 (141 GB bf16: 360 s to first token unoptimised): 141 GB at 0.6 GB/s
    is 235 s plus 120 s of engine start (torch.compile, CUDA-graph capture, warm-up).
    Streamed weights and a persistent compile cache gave 126 s there: about 2.1 GB/s and
    60 s. Node provisioning (cloud GPU node + image pull) is our assumption."""

    node_provision_s: float = Field(180.0, ge=0)
    weight_load_gb_per_s: float = Field(0.6, gt=0)
    engine_start_s: float = Field(120.0, ge=0)


class AutoscalingConfig(_Strict):
    """Ray Serve replica autoscaling of one pool (engine replicas, not pods)."""

    # ongoing-requests: Serve's default policy; queue-kv and slo: ours (autoscaling/). slo
    # by default: the only one that held the SLO through both the diurnal and the burst
    # day of the evaluation (autoscaling/README.md#evaluation).
    policy: AutoscalingPolicyName = "slo"
    # Requests in flight per replica the policy aims at (all three divide by it): the
    # setting that matters most; calibrate it (`cluster bench autoscale`). The default is
    # the 32k pool's calibration on h100x8-bf16; 128k-context pools want about 1.
    target_ongoing_requests: float = Field(7.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    upscaling_factor: float = Field(1.0, gt=0)
    downscaling_factor: float = Field(0.5, gt=0)
    # Serve's metric cadence: replicas report every metrics_interval_s, the controller
    # averages over look_back_period_s (Ray's defaults).
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)
    queue_kv: QueueKVPolicyConfig = Field(default_factory=QueueKVPolicyConfig)
    slo: SLOPolicyConfig = Field(default_factory=SLOPolicyConfig)
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)


class PoolConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    max_model_len: int = Field(ge=256)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    # Accept work from a smaller pool when that pool is saturated (see PoolSelector).
    accepts_spill: bool = True
    engine: EngineArgs = Field(default_factory=EngineArgs)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)

    @model_validator(mode="after")
    def _replica_bounds(self) -> PoolConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"pool {self.name!r}: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(
                f"pool {self.name!r}: initial_replicas {self.initial_replicas} outside "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        return self

    @property
    def start_replicas(self) -> int:
        return self.initial_replicas if self.initial_replicas is not None else max(1, self.min_replicas)

    @property
    def ray_resource(self) -> str:
        """Custom Ray resource that this pool's nodes advertise (one unit per bundle slot)
        and its engine bundles ask for, so a replica lands on its own pool's worker group
        and the autoscaler grows the right group (see NodeShape.pin_pools)."""
        return "pool_" + self.name.replace("-", "_")


class NodeShape(_Strict):
    """One Kubernetes GPU node (or the local CPU machine): a replica never spans nodes."""

    accelerator: Literal["gpu", "cpu"] = "gpu"
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"  # nvidia.com/gpu.product label value
    gpus_per_node: int = Field(8, ge=0)
    gpu_memory_gib: float = Field(80.0, ge=0)
    cpus_per_node: int = Field(96, ge=1)
    memory_gib: float = Field(1800.0, gt=0)
    # Engine bundles ask for their pool's resource (PoolConfig.ray_resource): without it
    # any GPU worker group may host any pool's replica and pod bounds per pool mean little.
    pin_pools: bool = True


class KvEventsConfig(_Strict):
    """vLLM's KV cache events (cluster.routing.kv_events): each engine replica publishes
    them (ZMQ PUB, with a replay socket) and the routers' prefix indexes follow them
    exactly; one section, so both sides agree. Off: the index is the router's own
    approximation (also the fallback for a replica whose events stop).

    Ports: replicas of one host must not clash, so the replica of node-local rank k in
    the i-th pool binds `port + i * pool_port_stride + k` (replay: `replay_port + ...`,
    the same offsets) and reports the endpoints in its routing stats. The same scheme
    sets the base port of Ray's KVAwareRouter (policy ray-kv-aware)."""

    enabled: bool = False
    port: int = Field(5557, ge=1, le=65535)
    replay_port: int | None = Field(6557, ge=1, le=65535)
    # Ports per pool: more than the replicas of one pool on one node.
    pool_port_stride: int = Field(100, ge=1, le=1000)
    topic: str = "kv-events"

    def pool_port(self, pool_index: int) -> int:
        return self.port + pool_index * self.pool_port_stride

    def engine_config(self, pool_index: int = 0) -> dict[str, Any] | None:
        """vLLM's `kv_events_config` engine argument of the i-th pool (ports of its node-local
        rank 0; deployments.engine adds the replica's rank), None when off."""
        from cluster.routing.kv_events import kv_events_engine_config

        replay = self.replay_port + pool_index * self.pool_port_stride if self.replay_port is not None else None
        return kv_events_engine_config(self.enabled, self.pool_port(pool_index), replay, self.topic)


class RouterConfig(_Strict):
    """Request routing inside a pool; see cluster.routing."""

    # A cluster.routing policy ("cache-aware", a baseline) or one of RAY_POLICIES.
    policy: str = "cache-aware"
    stats_period_s: float = Field(1.0, gt=0)
    stats_timeout_s: float = Field(2.0, gt=0)
    # Tokens per block of the prefix index; None means the engine's block size.
    index_block_size: int | None = None
    # Our policy's keyword arguments, or ray-prefix-aware's request_router_kwargs.
    options: dict[str, Any] = Field(default_factory=dict)
    kv_events: KvEventsConfig = Field(default_factory=KvEventsConfig)

    @property
    def ray_router(self) -> bool:
        """One of Ray's own routers rather than ours (deployments.request_router)."""
        return self.policy in RAY_POLICIES

    @model_validator(mode="after")
    def _check_policy(self) -> RouterConfig:
        # Build the policy once so a typo fails `cluster plan` / `render`, not the router
        # inside a running gateway replica.
        if self.ray_router:
            if self.options and self.policy != RAY_PREFIX_AWARE_POLICY:
                raise ValueError(f"router.options do not apply to policy {self.policy!r}")
            if self.kv_events.enabled:
                raise ValueError(
                    f"router.kv_events feed our routers' indexes; policy {self.policy!r} is Ray's own "
                    f"({RAY_KV_AWARE_POLICY} configures the engines' events itself)"
                )
            return self
        from cluster.routing.registry import make_policy

        make_policy(self.policy, block_size=self.index_block_size or 16, **self.options)
        return self


class SessionConfig(_Strict):
    """Redis-backed conversation state; see cluster.sessions."""

    enabled: bool = True
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_url_env: str | None = "CLUSTER_REDIS_URL"  # overrides redis_url when set
    sentinel_master: str | None = None
    pool_size: int = Field(default=32, ge=1)
    socket_timeout_s: float = Field(default=2.0, gt=0)
    ttl_s: int = Field(default=24 * 3600, ge=60)
    max_turns: int = Field(default=200, ge=1)
    max_tokens: int | None = None  # None: the largest pool's max_model_len / 2
    retry_after_s: int = Field(default=5, ge=1)
    # Added by cluster.sessions (all optional, defaults keep earlier configs valid):
    connect_timeout_s: float = Field(default=1.0, gt=0)
    retries: int = Field(default=2, ge=0)  # reconnect attempts per command; commits are idempotent
    health_check_interval_s: int = Field(default=30, ge=0)
    key_prefix: str = Field(default="mls", pattern=r"^[a-z][a-z0-9_-]{0,15}$")
    # When a cap is exceeded, drop oldest whole turns down to this fraction of the cap, so
    # the kept prefix then stays identical for many turns (see cluster.sessions.truncation).
    truncate_to_fraction: float = Field(default=0.75, gt=0, lt=1)
    tls_ca_file: str | None = None  # CA bundle for rediss:// (the system store otherwise)
    sentinel_password_env: str | None = None  # password of the Sentinel nodes, if they need one
    # Durability across a failover: a turn is acknowledged only once this many replicas have
    # it (Redis WAIT after the commit); fewer within the timeout -> 503, and the retried
    # commit (same turn id) is recognised. None: 1 with Sentinel, else 0. With 0 a failover
    # can lose the turns of the last replication lag (asynchronous replication).
    commit_replicas: int | None = Field(default=None, ge=0)
    commit_replica_timeout_ms: int = Field(default=1000, ge=1)

    @property
    def replicas_to_ack(self) -> int:
        if self.commit_replicas is not None:
            return self.commit_replicas
        return 1 if self.sentinel_master else 0

    @model_validator(mode="after")
    def _check_commit_timeout(self) -> SessionConfig:
        # WAIT blocks the connection: the socket must outlive it or every slow ack is a timeout.
        if self.replicas_to_ack and self.commit_replica_timeout_ms >= self.socket_timeout_s * 1000:
            raise ValueError(
                f"sessions.commit_replica_timeout_ms ({self.commit_replica_timeout_ms}) must be below "
                f"sessions.socket_timeout_s ({self.socket_timeout_s} s): WAIT holds the connection that long"
            )
        return self


# Tenant names end up inside Redis keys: no ':', '{' or '}'.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class AuthConfig(_Strict):
    """Tenants authenticate with bearer keys; only SHA-256 hashes are configured."""

    enabled: bool = False
    # tenant name -> list of sha256 hex digests of its API keys
    tenants: dict[str, list[str]] = Field(default_factory=dict)
    api_keys_env: str | None = "CLUSTER_API_KEY_HASHES"  # JSON of the same shape, from a Secret
    # The tenant of every request while auth is off.
    default_tenant: str = Field(default="default", pattern=TENANT_PATTERN)

    @model_validator(mode="after")
    def _check_tenants(self) -> AuthConfig:
        # Tenant names become part of Redis keys; hashes must be SHA-256 hex digests.
        for tenant, hashes in self.tenants.items():
            if not re.fullmatch(TENANT_PATTERN, tenant):
                raise ValueError(f"auth tenant name {tenant!r} must match {TENANT_PATTERN}")
            for i, digest in enumerate(hashes):
                if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                    raise ValueError(
                        f"auth tenant {tenant!r}: key hash #{i} is not a SHA-256 hex digest (64 hex characters); "
                        "configure hashes, never keys: python -m cluster.auth hash"
                    )
        return self


PriorityClass = Literal["interactive", "batch"]
# Served first to last at saturation (see cluster.admission.fair_queue).
PRIORITY_ORDER: tuple[PriorityClass, ...] = ("interactive", "batch")


class TenantLimits(_Strict):
    """One tenant's admission limits; None means unlimited. See cluster.admission."""

    requests_per_minute: int | None = Field(None, ge=1)
    # prompt + max_tokens x n is reserved at admission, corrected with real usage at the end
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    max_tokens_cap: int | None = Field(None, ge=1)  # a larger max_tokens is refused (400)
    max_tokens_default: int | None = Field(None, ge=1)  # used when the request sets none
    max_n: int = Field(8, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)
    # Fair share at saturation: queued requests are served in proportion to weights.
    weight: float = Field(1.0, gt=0)
    priority: PriorityClass = "interactive"  # the tenant's default class
    allowed_priorities: list[PriorityClass] = Field(default_factory=lambda: list(PRIORITY_ORDER))
    # Tenants naming the same group share one prefix-cache salt (e.g. one organisation's
    # common system prompt); None: the tenant's cache is its own.
    cache_group: str | None = Field(None, pattern=TENANT_PATTERN)

    @model_validator(mode="after")
    def _check(self) -> TenantLimits:
        if self.max_tokens_cap and self.max_tokens_default and self.max_tokens_default > self.max_tokens_cap:
            raise ValueError(f"max_tokens_default {self.max_tokens_default} > max_tokens_cap {self.max_tokens_cap}")
        if self.priority not in self.allowed_priorities:
            raise ValueError(f"default priority {self.priority!r} is not in allowed_priorities")
        return self


class FairQueueConfig(_Strict):
    """The gateway's queue per pool once the pool is saturated (cluster.admission.fair_queue)."""

    enabled: bool = True
    # A pool is saturated at this many requests in flight per running engine replica
    # (None: the engine's max_num_seqs, i.e. what it batches at once).
    in_flight_per_replica: int | None = Field(None, ge=1)
    max_queued_per_pool: int = Field(256, ge=0)  # beyond it: shed (503)
    deadline_s: float = Field(10.0, gt=0)  # queued longer: 429 with Retry-After
    retry_after_s: int = Field(2, ge=1)


class AdmissionConfig(_Strict):
    """Per-tenant limits enforced across gateway replicas with shared state in Redis (the
    sessions' Redis); see cluster.admission."""

    enabled: bool = True
    default_limits: TenantLimits = Field(default_factory=TenantLimits)
    # tenant -> limits replacing the defaults for that tenant (whole, not merged)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)
    # Redis for a decision must answer within this; otherwise the local fallback decides.
    redis_timeout_s: float = Field(0.25, gt=0)
    # After a Redis failure each gateway enforces 1/N of every budget alone for this long
    # before it tries Redis again (N: running gateway replicas).
    fallback_s: float = Field(2.0, gt=0)
    # A concurrency slot of a gateway that died is freed after this long.
    lease_s: int = Field(900, ge=10)
    usage_ttl_days: int = Field(62, ge=1)  # per-day usage counters kept for chargeback
    isolate_cache: bool = True  # cache_salt per tenant (or cache_group)
    queue: FairQueueConfig = Field(default_factory=FairQueueConfig)

    @model_validator(mode="after")
    def _check_tenants(self) -> AdmissionConfig:
        for tenant in self.tenants:
            if not re.fullmatch(TENANT_PATTERN, tenant):
                raise ValueError(f"admission tenant name {tenant!r} must match {TENANT_PATTERN}")
        return self

    def limits(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default_limits)


class GatewayConfig(_Strict):
    """The ingress deployment (CPU only): Serve autoscales it on ongoing requests."""

    min_replicas: int = Field(2, ge=1)
    max_replicas: int = Field(8, ge=1)
    target_ongoing_requests: int = Field(256, ge=1)
    # Each gateway request is a cheap async stream; the cap only guards runaway load.
    max_ongoing_requests: int = Field(4096, ge=1)
    num_cpus: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> GatewayConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"gateway.min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ResilienceConfig(_Strict):
    """What the gateway does when an engine replica fails, dies or wedges (see
    cluster.gateway.steps.dispatch and cluster.gateway.migration)."""

    # Engine calls per request before its first chunk (the first try included): each retry
    # goes to another replica of the pool, the last ones to a larger pool that fits.
    max_attempts: int = Field(3, ge=1)
    # No new attempt starts once the request is this old; then 503 with Retry-After. Above
    # the time Serve takes to replace a replica that stopped answering (a wedged engine).
    retry_deadline_s: float = Field(60.0, gt=0)
    # A replica that failed a request gets no new requests for this long (every router of
    # this gateway skips it at once, not one stats period later).
    exclude_failed_s: float = Field(30.0, gt=0)
    # Continue a stream cut by a replica failure on another replica (prompt + the tokens
    # already sent, as token ids), at most this many times per request; 0 turns it off.
    max_migrations: int = Field(3, ge=0)
    # An engine with requests in flight and no scheduler step for this long is wedged: its
    # routing stats say so (routers skip it) and its health check fails (Serve replaces it).
    wedged_after_s: float = Field(15.0, gt=0)
    retry_after_s: int = Field(2, ge=1)


# Seconds a pod needs after its Serve replicas have drained to stop Ray and exit.
DRAIN_STOP_MARGIN_S = 30


class DrainConfig(_Strict):
    """How long a request in flight may take to finish when its replica, pod, node or
    whole cluster goes away (node drain, upgrade, scale-down). This one value is the drain
    budget; every timeout of the chart and of Serve's graceful shutdown derives from it,
    so none can cut a request another still waits for."""

    # The longest request we promise to finish: a 128k-context generation streams for minutes.
    grace_period_s: int = Field(default=600, ge=30, le=3600)
    # Every config change is a redeploy of the app (the typed config is its argument): Serve
    # starts this share of each deployment's replicas (rounded up: at least one) as new ones
    # and stops old ones only once those serve, so a pool never drops below its size while
    # it rolls (Serve's default, 0, stops old replicas first: a one-replica pool goes dark).
    # The cluster needs room for the extra replicas (the autoscaler adds a node, if it can;
    # until then the old replicas keep serving).
    redeploy_surge_percent: int = Field(default=25, ge=1, le=100)

    def surge_replicas(self, replicas: int) -> int:
        """Extra replicas a deployment of `replicas` may start during a redeploy
        (Serve's rounding of max_surge_percent)."""
        return (self.redeploy_surge_percent * replicas + 99) // 100

    @property
    def request_timeout_s(self) -> int:
        """Gateway API route request timeout: nothing legitimately runs longer."""
        return self.grace_period_s

    @property
    def replica_shutdown_s(self) -> int:
        """Serve graceful_shutdown_timeout_s of every deployment."""
        return self.grace_period_s

    @property
    def pod_termination_s(self) -> int:
        """terminationGracePeriodSeconds of every Ray pod: drain, then stop Ray."""
        return self.grace_period_s + DRAIN_STOP_MARGIN_S

    @property
    def old_cluster_deletion_delay_s(self) -> int:
        """RayService rayClusterDeletionDelaySeconds: the old cluster keeps serving the
        requests it accepted before the switch until they are done."""
        return self.grace_period_s + DRAIN_STOP_MARGIN_S


class GatewayMetricsConfig(_Strict):
    """The gateway's Prometheus metrics (cluster.gateway.metrics)."""

    # Served on the API port, as vLLM's own server does (AIPerf and similar clients look
    # there); None turns that endpoint off. Behind Serve's proxy a scrape of the API port
    # reaches one gateway replica of several, so the chart scrapes `port` instead.
    path: str | None = Field("/metrics", pattern=r"^/[A-Za-z0-9/_-]*$")
    # A listener of its own in each gateway replica (at most one gateway per node), None: none.
    port: int | None = Field(None, ge=1, le=65535)


class TelemetryConfig(_Strict):
    # OTLP collector for traces of the gateway and (engine_traces) of vLLM, e.g.
    # http://otel-collector:4317 (grpc) or http://otel-collector:4318/v1/traces (http/protobuf).
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http/protobuf"] = "grpc"
    service_name: str = "mistral-large-serve"
    # vLLM exports a span per request (child of the gateway's, via traceparent) to the same endpoint.
    engine_traces: bool = True
    metrics: GatewayMetricsConfig = Field(default_factory=GatewayMetricsConfig)


class SimulatorConfig(_Strict):
    """What the cluster simulator (bench/sim/) needs to know of this deployment beyond
    the engines; the engines' own step times come from bench/calibration/."""

    # Time the serving path adds to every request outside the engine: client -> Serve
    # proxy -> gateway pipeline -> router -> Serve handle -> engine frontend, and the
    # first token's way back. The simulator delivers each request to its engine this
    # long after the client sent it, so TTFT and E2E include it once and TPOT not at all.
    # Measured per profile with `cluster bench replay --engine-timing` (the client's TTFT
    # beyond the engine's own queue and prefill, during a replay).
    request_overhead_ms: float = Field(0.0, ge=0)
    # ... and it slows with the client's other requests in flight (the gateway, proxy
    # and engine frontends share the cores with busy engines): each request's overhead
    # grows by this much per other request in flight when it is sent. Measured with the
    # overhead (the slope of its medians by requests in flight); the overhead and its
    # spread are then those of a request sent alone. 0: a constant path.
    request_overhead_per_in_flight_ms: float = Field(0.0, ge=0)
    # The first token's way back to the client takes this much longer than a later
    # token's (the gateway's and proxy's first chunk of a stream: headers, the response
    # set-up); the simulator delivers the last token this much earlier relative to the
    # first, so client TPOT is the engine's minus stream_lead_ms / (tokens - 1).
    stream_lead_ms: float = 0.0  # negative: the last token comes back slower
    # Engines that share their cores with the serving path and the rest of the machine
    # (CPU profiles only) step this many times slower than the table measured on the
    # engine alone (bench/calibration/engine_step_table.py reads it; GPU tables ignore it).
    engine_step_scale: float = Field(1.0, gt=0)
    # Measured spreads of the three terms (bench/sim/spread.py: quantiles at 0.05, 0.15,
    # ..., 0.95, from `cluster bench replay --engine-timing`): when given, each request
    # draws its overhead and stream lead, and each engine step its scale, from these
    # instead of taking the constant above. Empty: the constants.
    request_overhead_spread_ms: list[float] = Field(default_factory=list)
    stream_lead_spread_ms: list[float] = Field(default_factory=list)
    engine_step_scale_spread: list[float] = Field(default_factory=list)
    # Correlation of consecutive steps' scales (normal scores; measured with the spread):
    # slow steps come in spells on shared cores, so a request's TPOT varies more than
    # independent draws give. The simulator draws an AR(1) with this lag-1 correlation;
    # `cluster bench replay --engine-timing` measures the one whose means over a reply's
    # decode steps vary as measured (bench/sim/spread.py, `horizon_autocorr`): the spells
    # last longer than one lag's decay says. 0: each step draws alone.
    engine_step_scale_autocorr: float = Field(0.0, ge=0.0, lt=1.0)
    # Engines of one machine share its cores (CPU profiles: the local cluster runs every
    # replica on one machine): a step taken while k other engines are stepping takes
    # 1 + k x (engine_contention_scale - 1) times as long. Measured as the step-scale
    # median of steps that overlapped another replica's step over that of steps that did
    # not; the spread above is then measured on the latter. 1: no sharing (GPU profiles,
    # where each replica has its own devices).
    engine_contention_scale: float = Field(1.0, ge=1.0)
    # Each sequence beyond the first in a step makes a CPU step this fraction longer than
    # the table's: every running reply is streamed by the engine's frontend, the proxy and
    # the gateway on the same cores, which the table (the engine measured alone) does not
    # pay. Measured as the slope of the step scale's medians by sequences in the step,
    # over that of one sequence (steps as if alone). 0: the table's batch cost as is.
    engine_batch_stretch: float = Field(0.0, ge=0.0)
    # A step's prefill work runs this many times slower, relative to the table, than its
    # decode work. The scale above is measured mostly on decode steps, and a CPU other than
    # the table's can differ most in the prompt's matrix products: on an AVX2-only VM
    # prefills took far longer than the step scale gave, against a table measured with
    # AVX-512. `--engine-timing` reports one measured from the steps that carried a
    # prefill chunk (`engine_prefill_scale_measured`) but does not calibrate it: part of
    # that is a cost per new request, not per token. Set by hand. 1: the table's mix.
    engine_prefill_scale: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check_spreads(self) -> SimulatorConfig:
        for name in ("request_overhead_spread_ms", "stream_lead_spread_ms", "engine_step_scale_spread"):
            values = getattr(self, name)
            if values and len(values) != 10:
                raise ValueError(f"simulator.{name} holds 10 quantiles (0.05 ... 0.95), got {len(values)}")
        if any(v < 0 for v in self.request_overhead_spread_ms):
            raise ValueError("simulator.request_overhead_spread_ms must be >= 0")
        if any(v <= 0 for v in self.engine_step_scale_spread):
            raise ValueError("simulator.engine_step_scale_spread must be > 0")
        return self


class ClusterConfig(_Strict):
    profile: str = "custom"
    model: ModelConfig = Field(default_factory=ModelConfig)
    node: NodeShape = Field(default_factory=NodeShape)
    pools: list[PoolConfig]
    router: RouterConfig = Field(default_factory=RouterConfig)
    sessions: SessionConfig = Field(default_factory=SessionConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    drain: DrainConfig = Field(default_factory=DrainConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    http_port: int = Field(8000, ge=1, le=65535)

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if not self.pools:
            raise ValueError("at least one pool is required")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        lens = [p.max_model_len for p in self.pools]
        if len(set(lens)) != len(lens):
            raise ValueError(f"pools must differ in max_model_len, got {lens}")
        for pool in self.pools:
            self._check_pool(pool)
        # Keep pools ordered by context so "smallest fitting pool" is the first match.
        self.pools.sort(key=lambda p: p.max_model_len)
        self._check_kv_events()
        self._check_streamed_source()
        return self

    def _check_streamed_source(self) -> None:
        """An object-store source has no local copy: only the runai_streamer loader reads it."""
        if not is_object_store_uri(self.model.source):
            return
        fetching = [p.name for p in self.pools if not p.engine.stream_weights.enabled]
        if fetching:
            raise ValueError(
                f"model.source {self.model.source!r} is an object-store URI, which vLLM reads only with its "
                f"runai_streamer loader: set engine.stream_weights.enabled on pools {fetching} (every pool), "
                "or make model.source the local path of a copy (a PVC, or the chart's weights.objectStore fetch)"
            )

    def _check_kv_events(self) -> None:
        ev = self.router.kv_events
        if not ev.enabled:
            return
        for pool in self.pools:
            index_block = self.router.index_block_size or pool.engine.block_size
            if index_block != pool.engine.block_size:
                raise ValueError(
                    f"router.kv_events: the index block size {index_block} must equal pool {pool.name!r}'s "
                    f"engine block size {pool.engine.block_size} (events name engine blocks)"
                )
        span = ev.pool_port_stride * len(self.pools)
        if ev.replay_port is not None and abs(ev.replay_port - ev.port) < span:
            raise ValueError(
                f"router.kv_events: replay_port {ev.replay_port} must be at least {span} away from port {ev.port} "
                f"(pool_port_stride {ev.pool_port_stride} x {len(self.pools)} pools), or replicas' ports clash"
            )

    def _check_pool(self, pool: PoolConfig) -> None:
        arch = self.model.architecture
        tp = pool.engine.tensor_parallel_size
        if pool.max_model_len > arch.max_position_embeddings:
            raise ValueError(
                f"pool {pool.name!r}: max_model_len {pool.max_model_len:,} exceeds the model's "
                f"{arch.max_position_embeddings:,} positions"
            )
        if self.node.accelerator == "gpu":
            if tp > self.node.gpus_per_node:
                raise ValueError(
                    f"pool {pool.name!r}: tensor_parallel_size {tp} is larger than one node "
                    f"({self.node.gpus_per_node} GPUs per node); a replica never spans nodes"
                )
            if arch.num_attention_heads % tp:
                raise ValueError(
                    f"pool {pool.name!r}: {arch.num_attention_heads} attention heads do not "
                    f"divide over tensor_parallel_size {tp}"
                )
        else:
            if tp != 1:
                raise ValueError(f"pool {pool.name!r}: the CPU backend runs tensor_parallel_size 1, got {tp}")
            # vLLM's CPU attention backend pages the KV cache in multiples of 32 tokens.
            if pool.engine.block_size % 32:
                raise ValueError(
                    f"pool {pool.name!r}: block_size {pool.engine.block_size} is not a multiple of 32, "
                    "which vLLM's CPU backend requires"
                )
        plan = self.memory_plan(pool)
        if not plan.fits():
            raise ValueError(
                f"pool {pool.name!r} does not fit: {plan.explain()}. "
                "Raise tensor_parallel_size, use fp8 weights/KV, or lower max_model_len."
            )

    def memory_plan(self, pool: PoolConfig) -> MemoryPlan:
        e = pool.engine
        weight_dtype = "fp8" if e.quantization == "fp8" else self.model.weight_dtype
        return plan_replica(
            pool=pool.name,
            arch=self.model.architecture,
            weight_dtype=weight_dtype,
            kv_dtype=e.kv_dtype(),
            accelerator=self.node.accelerator,
            tensor_parallel_size=e.tensor_parallel_size,
            gpu_memory_gib=self.node.gpu_memory_gib,
            gpu_memory_utilization=e.gpu_memory_utilization,
            reserve_gib_per_device=e.reserve_gib_per_device,
            cpu_kv_cache_space_gib=e.cpu_kv_cache_space_gib,
            block_size=e.block_size,
            max_model_len=pool.max_model_len,
        )

    def pool(self, name: str) -> PoolConfig:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool named {name!r}; pools: {[p.name for p in self.pools]}")

    @property
    def max_context(self) -> int:
        return max(p.max_model_len for p in self.pools)

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterConfig:
        data = yaml.safe_load(Path(path).read_text())
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


__all__ = [
    "AdmissionConfig",
    "AuthConfig",
    "FairQueueConfig",
    "PRIORITY_ORDER",
    "PriorityClass",
    "TenantLimits",
    "AutoscalingConfig",
    "AutoscalingPolicyName",
    "ColdStartConfig",
    "ClusterConfig",
    "DrainConfig",
    "EngineArgs",
    "GatewayMetricsConfig",
    "GiB",
    "ModelConfig",
    "NodeShape",
    "PoolConfig",
    "QueueKVPolicyConfig",
    "RouterConfig",
    "SERVED_MODEL_NAME",
    "SLOPolicyConfig",
    "SessionConfig",
    "SimulatorConfig",
    "TelemetryConfig",
]
