"""The gateway: one public model name in front of several engine pools, as a pipeline.

Read `build_pipelines` top to bottom to follow a request; each step is a module in
`cluster.gateway.steps`. Ray-free: the engines are reached through an `EngineClient`
(deployments.engine_client on Ray Serve handles; fakes in unit tests) and the FastAPI app
is `cluster.gateway.app.build_gateway_app`.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.trace import Tracer

from cluster.admission.limiter import TenantLimiter
from cluster.auth import TenantAuthenticator
from cluster.config import ClusterConfig
from cluster.gateway.engine import EngineClient
from cluster.gateway.fleet import FleetStatus
from cluster.gateway.metrics import GatewayMetrics, InFlightCollector
from cluster.gateway.pipeline import Pipeline
from cluster.gateway.steps.admit import Admit
from cluster.gateway.steps.authenticate import Authenticate
from cluster.gateway.steps.choose_pool import ChoosePool
from cluster.gateway.steps.dispatch import Dispatch
from cluster.gateway.steps.fair_share import FairShare
from cluster.gateway.steps.finish import Finish
from cluster.gateway.steps.isolate import Isolate
from cluster.gateway.steps.measure import Measure
from cluster.gateway.steps.route import Route
from cluster.gateway.steps.session import Session
from cluster.gateway.steps.tokenize import TokenizeChat, TokenizeCompletion
from cluster.gateway.steps.trace import Trace, TraceEngineCall
from cluster.gateway.steps.validate import Validate
from cluster.routing.hints import HINTS, HintBoard
from cluster.routing.pool_selector import PoolSelector
from cluster.routing.replica_health import HEALTH, ReplicaHealth
from cluster.sessions import SessionFlow
from cluster.tokenizer import PromptTokenizer


@dataclass
class Gateway:
    cfg: ClusterConfig
    auth: TenantAuthenticator
    sessions: SessionFlow
    fleet: FleetStatus
    chat: Pipeline
    completions: Pipeline
    pools: ChoosePool  # shared by both pipelines: one in-flight count per pool
    # The OpenAI request models the API parses (Ray Serve LLM's in a deployment).
    chat_model: type
    completion_model: type
    metrics: GatewayMetrics
    limiter: TenantLimiter | None = None


def build_gateway(
    cfg: ClusterConfig,
    engine: EngineClient,
    *,
    request_models: tuple[type, type],
    sessions: SessionFlow | None = None,
    tokenizer: PromptTokenizer | None = None,
    board: HintBoard = HINTS,
    health: ReplicaHealth = HEALTH,
    tracer: Tracer | None = None,
    limiter: TenantLimiter | None = None,
) -> Gateway:
    """`request_models`: the (chat, completion) request classes."""
    tokenizer = tokenizer or PromptTokenizer.for_model(cfg.model)
    auth = TenantAuthenticator.from_config(cfg.auth)
    # Connects lazily: the gateway starts (and serves stateless requests) without Redis.
    sessions = sessions or SessionFlow.from_config(cfg, token_counter=tokenizer.count_message_tokens)
    fleet = FleetStatus.from_config(cfg)
    pools = ChoosePool(PoolSelector(cfg.pools), fleet.snapshot)
    metrics = GatewayMetrics.from_config(cfg)
    metrics.add_gauges(InFlightCollector(pools.in_flight))
    block_sizes = {p.name: cfg.router.index_block_size or p.engine.block_size for p in cfg.pools}
    chat_model, completion_model = request_models
    limiter = limiter or TenantLimiter.from_config(cfg, gateways=lambda: fleet.gateways)
    # Shared by both pipelines: one limiter view and one fair queue per pool.
    admit = Admit(cfg.admission, limiter, cfg.max_context)
    fair_share = FairShare(cfg, fleet.snapshot)
    isolate = Isolate(cfg.admission)

    def pipeline(tokenize: TokenizeChat | TokenizeCompletion) -> Pipeline:
        route = Route(board, block_sizes)
        return Pipeline(
            [
                Trace(tracer),  # one span per request, parented by the client's traceparent
                Measure(metrics),  # the request's metrics, refused ones too
                Authenticate(auth),  # bearer key -> tenant (401)
                Validate(cfg.model.served_name),  # model name, non-empty input (400/404)
                Session(sessions),  # history prepended; turn committed at the end (409/503)
                tokenize,  # prompt tokens, counted once as the engine will
                admit,  # tenant caps (400), rate limits in Redis (429), x-ratelimit-* headers
                pools,  # smallest fitting pool, spill when saturated (400 beyond the largest)
                fair_share,  # saturated pool: fair queue across tenants, by priority (503)
                isolate,  # the tenant's prefix-cache salt, before the prompt is hashed
                route,  # hint for the pool's router: hashes, affinity, replicas to avoid
                TraceEngineCall(tracer),  # a span for the engine call; its traceparent goes to vLLM
                Dispatch(  # call the engines: retry before the first chunk, migrate a cut stream
                    engine,
                    cfg.model.served_name,
                    route=route,
                    pools=pools,
                    health=health,
                    resilience=cfg.resilience,
                    completion_model=completion_model,
                    metrics=metrics,
                ),
                Finish(board, tokenizer),  # tell the router what the replica now caches
            ]
        )

    return Gateway(
        cfg=cfg,
        auth=auth,
        sessions=sessions,
        fleet=fleet,
        chat=pipeline(TokenizeChat(tokenizer)),
        completions=pipeline(TokenizeCompletion(tokenizer)),
        pools=pools,
        chat_model=chat_model,
        completion_model=completion_model,
        metrics=metrics,
        limiter=limiter,
    )


__all__ = ["Gateway", "build_gateway"]
