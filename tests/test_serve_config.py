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
