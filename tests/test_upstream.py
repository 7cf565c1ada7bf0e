"""Every private Ray/vLLM API we rely on still exists at the pinned versions (an upgrade
fails here, naming the shim, not deep inside a request)."""

from __future__ import annotations

import inspect
import warnings

from cluster.tokenizer import PromptTokenizer
from cluster.upstream import ray_serve, vllm


def test_versions_match_the_pins() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a version other than the pins would warn
        assert ray_serve.ray_version().startswith(ray_serve.RAY_VERSION)
        assert vllm.vllm_version().startswith(vllm.VLLM_VERSION)


def test_every_vllm_shim_resolves() -> None:
    assert vllm.error_response_type().__name__ == "ErrorResponse"
    assert inspect.isabstract(vllm.aggregate_stat_logger_base())
    chat, completion = vllm.request_models()
    body = chat.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": None})
    vllm.prepare_chat_request(body)
    tok = PromptTokenizer()
    ids = vllm.apply_chat_template(tok.vllm_tokenizer, body.messages, tokenize=True)
    assert isinstance(ids, list) and ids
    assert completion.model_validate({"prompt": "x"}).prompt == "x"


def test_every_ray_shim_resolves() -> None:
    from ray.serve.api import _run

    assert "_blocking" in inspect.signature(_run).parameters  # deploy_without_waiting
    from ray._private import worker

    assert hasattr(worker, "_global_node")  # node_log_dir


def test_the_stat_logger_plugin_is_registered() -> None:
    from importlib.metadata import entry_points

    from deployments.engine_stats import SchedulerStatsTap

    eps = {e.name: e.value for e in entry_points(group="vllm.stat_logger_plugins")}
    assert eps.get("mls_scheduler_stats") == "deployments.engine_stats:SchedulerStatsTap"
    tap = SchedulerStatsTap(vllm_config=None, engine_indexes=[0])
    tap.record(scheduler_stats="s", iteration_stats=None)
    assert tap.latest == {0: "s"}


def test_every_ray_cluster_shim_resolves() -> None:
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from cluster.upstream import ray_cluster

    assert "allow_graceful" in inspect.signature(Cluster.remove_node).parameters  # kill_node
    assert ray_constants.PROCESS_TYPE_RAYLET == ray_cluster._RAYLET  # raylet_pid
