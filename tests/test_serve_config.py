"""The rendered Ray Serve config is one Ray Serve accepts, and its per-deployment
overrides name the deployments deployments.app builds."""

from __future__ import annotations

import pytest

from cluster.profiles import PROFILES, load_profile
from deployments.serve_config import GATEWAY_DEPLOYMENT, engine_deployment, render_serve_config


@pytest.mark.parametrize("profile", PROFILES)
def test_serve_accepts_the_rendered_config(profile: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = load_profile(profile)
    schema = ServeDeploySchema.model_validate(render_serve_config(cfg))
    (app,) = schema.applications
    by_name = {d.name: d for d in app.deployments}
    assert by_name[GATEWAY_DEPLOYMENT].graceful_shutdown_timeout_s == cfg.drain.replica_shutdown_s
    for pool in cfg.pools:
        assert by_name[engine_deployment(pool.name)].graceful_shutdown_timeout_s == cfg.drain.replica_shutdown_s


def test_override_names_are_the_apps_deployment_names() -> None:
    from deployments.gateway import GATEWAY_DEPLOYMENT_NAME, engine_deployment_name

    assert GATEWAY_DEPLOYMENT == GATEWAY_DEPLOYMENT_NAME
    assert engine_deployment("long") == engine_deployment_name("long")


def test_the_app_drains_as_the_rendered_config_says() -> None:
    """`serve.run` of deployments.app (the local runner) and `serve deploy` of the rendered
    config (RayService) give every deployment the same drain options: graceful shutdown
    from drain.replica_shutdown_s, new replicas before old ones stop on a redeploy."""
    from cluster.upstream.ray_serve import deployment_configs
    from deployments.app import build_app
    from deployments.serve_config import drain_options

    cfg = load_profile("cpu-tiny")
    cfg.drain.grace_period_s, cfg.drain.redeploy_surge_percent = 120, 50
    (app,) = render_serve_config(cfg)["applications"]
    built = deployment_configs(build_app(app["args"]))
    assert set(built) == {d["name"] for d in app["deployments"]}
    for override in app["deployments"]:
        config = built[override["name"]]
        for option, value in drain_options(cfg).items():
            assert getattr(config, option) == value == override[option], (override["name"], option)
    assert drain_options(cfg) == {"graceful_shutdown_timeout_s": 120, "max_surge_percent": 50}


def test_the_local_cluster_has_room_for_a_redeploy() -> None:
    """A redeploy's new replicas run next to the old ones until those stop: the one local
    node advertises each pool's Ray resource for that many."""
    from cluster.ops.local import logical_cpus, pool_slots

    cfg = load_profile("cpu-tiny")
    assert cfg.drain.surge_replicas(2) == 1 and cfg.drain.surge_replicas(1) == 1
    assert pool_slots(cfg) == {"pool_standard": 3.0, "pool_long": 2.0}
    assert logical_cpus(cfg) >= (3 + 2) * 2
