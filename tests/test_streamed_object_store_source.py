"""An object-store model.source (s3://, gs://) loaded straight from the bucket by vLLM's
runai_streamer: config validation, the engines' model path and environment, the
gateway's tokenizer, and the chart (real helm) without a weight fetch or volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig, ModelConfig, ObjectStoreAccess
from cluster.ops.helm_values import render_helm_values
from cluster.profiles import load_profile
from cluster.tiny_model import bundled_v7_tokenizer
from cluster.tokenizer import tokenizer_file_for
from deployments.app import engine_kwargs, llm_config
from deployments.serve_config import engine_env
from tests import helm_tools
from tests.test_helm import one, ray_templates
from tests.test_helm_resilience import render_config

URI = "s3://weights-bucket/mistral/Mistral-Large-Instruct-2411"


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_tools.helm()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("values")


def streamed_config(
    source: str = URI, access: ObjectStoreAccess | None = None, streaming_pools: tuple[str, ...] = ("standard", "long")
) -> ClusterConfig:
    """h100x8-bf16 reading `source` from the object store on `streaming_pools`."""
    d = load_profile("h100x8-bf16").to_dict()
    d["model"]["source"] = source
    d["model"]["object_store"] = (access or ObjectStoreAccess(credentials_secret="weights-s3")).model_dump()
    for pool in d["pools"]:
        pool["engine"]["stream_weights"]["enabled"] = pool["name"] in streaming_pools
    return ClusterConfig.model_validate(d)


def test_an_object_store_source_needs_streamed_weights_on_every_pool() -> None:
    with pytest.raises(ValidationError) as err:
        streamed_config(streaming_pools=("standard",))
    message = str(err.value)
    assert "runai_streamer" in message and "engine.stream_weights.enabled on pools ['long']" in message
    with pytest.raises(ValidationError) as err:
        streamed_config(streaming_pools=())
    assert "pools ['standard', 'long']" in str(err.value)
    assert streamed_config().model.source == URI


@pytest.mark.parametrize(
    ("fields", "expect"),
    [
        ({"source": "az://container/Mistral-Large-Instruct-2411"}, "only s3:// and gs://"),
        ({"source": "s3://bucket-only"}, "scheme://bucket/folder"),
        (
            {"source": "/models/Mistral-Large-Instruct-2411", "object_store": {"credentials_secret": "s3"}},
            "not an object-store URI",
        ),
        ({"source": URI, "tokenizer_file": "s3://weights-bucket/tekken.json"}, "must be a local file"),
        ({"source": URI, "object_store": {"endpoint_url": "minio:9000"}}, "endpoint_url"),
    ],
    ids=["unsupported-scheme", "no-folder", "access-without-uri", "uri-tokenizer", "endpoint-without-scheme"],
)
def test_object_store_settings_that_cannot_work_are_refused(fields: dict[str, Any], expect: str) -> None:
    with pytest.raises(ValidationError) as err:
        ModelConfig.model_validate(fields)
    assert expect in str(err.value)


def test_the_engines_model_path_is_the_uri_and_they_stream_it() -> None:
    cfg = streamed_config()
    for pool in cfg.pools:
        llm = llm_config(cfg, pool, cfg.model.source)
        # Ray Serve LLM hands the URI to vLLM as the model when the load format streams
        # (it skips its own download: ray.llm download_utils.STREAMING_LOAD_FORMATS).
        assert llm.model_loading_config.model_source == URI
        assert engine_kwargs(cfg, pool)["load_format"] == "runai_streamer"
    from ray.llm._internal.common.utils.download_utils import STREAMING_LOAD_FORMATS
    from vllm.transformers_utils.runai_utils import is_runai_obj_uri

    assert "runai_streamer" in STREAMING_LOAD_FORMATS
    assert is_runai_obj_uri(URI)  # vLLM pulls config and tokenizer files from it, streams the weights


def test_the_engines_environment_carries_the_endpoint_not_the_secret() -> None:
    aws = streamed_config(access=ObjectStoreAccess(credentials_secret="weights-s3", region="eu-west-1"))
    assert engine_env(aws, aws.pool("standard"))["AWS_REGION"] == "eu-west-1"
    assert "AWS_ENDPOINT_URL" not in engine_env(aws, aws.pool("standard"))
    minio = streamed_config(access=ObjectStoreAccess(credentials_secret="minio", endpoint_url="http://minio:9000"))
    env = engine_env(minio, minio.pool("long"))
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert not any(k in env for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    assert "AWS_ENDPOINT_URL" not in engine_env(minio)  # the gateway and other actors
    # gs:// with HMAC keys goes through the S3 API at Google's endpoint.
    gcs = streamed_config("gs://weights/Mistral-Large-Instruct-2411", ObjectStoreAccess(credentials_secret="gcs-hmac"))
    assert engine_env(gcs, gcs.pool("standard"))["AWS_ENDPOINT_URL"] == "https://storage.googleapis.com"
    # gs:// without a Secret: the GCS SDK and the pod's workload identity, no S3 endpoint.
    identity = streamed_config("gs://weights/Mistral-Large-Instruct-2411", ObjectStoreAccess())
    assert "AWS_ENDPOINT_URL" not in engine_env(identity, identity.pool("standard"))


def test_the_gateway_tokenizer_of_a_uri_source_is_local() -> None:
    assert tokenizer_file_for(streamed_config().model) == bundled_v7_tokenizer()
    other = ModelConfig(source="s3://weights-bucket/Some-Other-Model")
    with pytest.raises(ValueError, match="model.tokenizer_file"):
        tokenizer_file_for(other)
    given = ModelConfig(source="s3://weights-bucket/Some-Other-Model", tokenizer_file="/opt/tok/tekken.json")
    assert tokenizer_file_for(given) == Path("/opt/tok/tekken.json")


def test_helm_values_of_a_uri_source_stream_it() -> None:
    weights = render_helm_values(streamed_config())["weights"]
    assert weights == {
        "source": "stream",
        "modelPath": "",
        "mountPath": "",
        "stream": {"uri": URI, "credentialsSecret": "weights-s3"},
    }


def test_the_chart_skips_the_fetch_and_gives_the_engines_the_secret(helm: Path, files: Path) -> None:
    docs = render_config(helm, files, streamed_config(), "stream")
    templates = ray_templates(one(docs, "RayService"))
    secret_env = {
        "AWS_ACCESS_KEY_ID": {"secretKeyRef": {"name": "weights-s3", "key": "AWS_ACCESS_KEY_ID"}},
        "AWS_SECRET_ACCESS_KEY": {"secretKeyRef": {"name": "weights-s3", "key": "AWS_SECRET_ACCESS_KEY"}},
        "AWS_SESSION_TOKEN": {"secretKeyRef": {"name": "weights-s3", "key": "AWS_SESSION_TOKEN", "optional": True}},
    }
    assert set(templates) == {"head", "cpu-gateway", "gpu-standard", "gpu-long"}
    for group, template in templates.items():
        spec = template["spec"]
        assert not spec.get("initContainers"), group  # no fetch-weights
        assert all(v["name"] != "weights" for v in spec["volumes"]), group
        container = spec["containers"][0]
        assert all(m["name"] != "weights" for m in container["volumeMounts"]), group
        env = {e["name"]: e.get("valueFrom") for e in container["env"]}
        if group.startswith("gpu-"):
            assert {k: env.get(k) for k in secret_env} == secret_env, group
        else:  # the head and the gateways never read the bucket
            assert not set(secret_env) & set(env), group
    # The same profile from a PVC keeps its volume and has no streamer credentials.
    pvc = ray_templates(one(render_config(helm, files, load_profile("h100x8-bf16"), "pvc"), "RayService"))
    spec = pvc["gpu-standard"]["spec"]
    assert any(v["name"] == "weights" for v in spec["volumes"])
    assert all(e["name"] != "AWS_ACCESS_KEY_ID" for e in spec["containers"][0]["env"])


def test_the_chart_refuses_a_stream_source_without_its_uri(helm: Path, files: Path) -> None:
    with pytest.raises(AssertionError) as err:  # helm exits non-zero with the chart's message
        render_config(helm, files, streamed_config(), "stream-no-uri", {"weights": {"stream": {"uri": ""}}})
    assert "weights.source=stream needs weights.stream.uri" in str(err.value)
