"""Reads one release from a live cluster into a `ClusterSnapshot` (kubernetes client).

Everything goes through the API server with the caller's kubeconfig (or the in-cluster
service account): the RayService, the RayClusters it names, the release's pods and PDBs
(label app.kubernetes.io/instance=<release>), the namespace's events about those objects,
and the Serve status from the head's dashboard (port 8265) through the API server's
service proxy, so no port-forward is needed.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from cluster.ops.doctor import INSTANCE_LABEL, ClusterSnapshot, rayservice_name

KUBERAY_GROUP, KUBERAY_VERSION = "ray.io", "v1"
SERVE_STATUS_PATH = "api/serve/applications/"
DASHBOARD_PORT_NAME = "dashboard"  # KubeRay's head Service port for 8265


class ClusterUnreachable(Exception):
    """No kubeconfig, the API server does not answer, or it refuses a read (RBAC)."""


def collect(namespace: str, release: str, *, context: str | None = None, name: str | None = None) -> ClusterSnapshot:
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException
    from urllib3.exceptions import HTTPError

    try:
        return _collect(namespace, release, context=context, name=name)
    except ConfigException as exc:
        raise ClusterUnreachable(f"no usable kubeconfig or in-cluster service account: {exc}") from exc
    except ApiException as exc:
        raise ClusterUnreachable(f"the API server refused a read: {exc.status} {exc.reason}") from exc
    except HTTPError as exc:
        raise ClusterUnreachable(f"the API server does not answer: {exc}") from exc


def _collect(namespace: str, release: str, *, context: str | None, name: str | None) -> ClusterSnapshot:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    try:
        # KUBECONFIG read now: the client's default is fixed when it is imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), context=context)
    except config.ConfigException:
        config.load_incluster_config()
    api = client.ApiClient()
    core, policy, custom = client.CoreV1Api(api), client.PolicyV1Api(api), client.CustomObjectsApi(api)
    to_dict = api.sanitize_for_serialization  # the API's JSON shape (camelCase, RFC 3339)
    snap = ClusterSnapshot(namespace=namespace, release=release, captured_at=datetime.now(UTC))
    rs_name = name or rayservice_name(release)
    try:
        snap.rayservice = _obj(
            custom.get_namespaced_custom_object(KUBERAY_GROUP, KUBERAY_VERSION, namespace, "rayservices", rs_name)
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
    for cluster_name in _cluster_names(snap.rayservice):
        try:
            obj = custom.get_namespaced_custom_object(
                KUBERAY_GROUP, KUBERAY_VERSION, namespace, "rayclusters", cluster_name
            )
            snap.rayclusters.append(_obj(obj))
        except ApiException as exc:
            if exc.status != 404:
                raise
    selector = f"{INSTANCE_LABEL}={release}"
    snap.pods = [
        _kind(to_dict(p), "v1", "Pod") for p in core.list_namespaced_pod(namespace, label_selector=selector).items
    ]
    snap.pdbs = [
        _kind(to_dict(p), "policy/v1", "PodDisruptionBudget")
        for p in policy.list_namespaced_pod_disruption_budget(namespace, label_selector=selector).items
    ]
    ours = {("Pod", p["metadata"]["name"]) for p in snap.pods}
    ours |= {("RayCluster", c["metadata"]["name"]) for c in snap.rayclusters}
    ours |= {("RayService", rs_name)} | {("PodDisruptionBudget", p["metadata"]["name"]) for p in snap.pdbs}
    events = [_kind(to_dict(e), "v1", "Event") for e in core.list_namespaced_event(namespace).items]
    snap.events = [e for e in events if (e["involvedObject"].get("kind"), e["involvedObject"].get("name")) in ours]
    snap.serve, snap.serve_error = _serve_status(core, namespace, snap)
    return snap


def _kind(obj: dict[str, Any], api_version: str, kind: str) -> dict[str, Any]:
    """List items come without apiVersion and kind; put them back, as `kubectl get -o json` does."""
    return {"apiVersion": api_version, "kind": kind, **obj}


def _obj(value: object) -> dict[str, Any]:
    """CustomObjectsApi returns the object's JSON as a dict (typed `object`)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object from the API, got {type(value).__name__}")
    return value


def _cluster_names(rayservice: dict[str, Any] | None) -> list[str]:
    if rayservice is None:
        return []
    status = rayservice.get("status") or {}
    names = [status.get(k, {}).get("rayClusterName") for k in ("activeServiceStatus", "pendingServiceStatus")]
    return [n for n in names if n]


def _serve_status(core: Any, namespace: str, snap: ClusterSnapshot) -> tuple[dict[str, Any] | None, str | None]:
    from kubernetes.client.exceptions import ApiException

    active = next(iter(snap.rayclusters), None)
    service = ((active or {}).get("status") or {}).get("head", {}).get("serviceName")
    if not service:
        return None, "no active RayCluster with a head Service"
    try:
        # _preload_content=False: the proxy returns JSON text, not a typed model.
        resp = core.connect_get_namespaced_service_proxy_with_path(
            f"{service}:{DASHBOARD_PORT_NAME}", namespace, SERVE_STATUS_PATH, _preload_content=False
        )
        return json.loads(resp.data), None
    except ApiException as exc:
        return (
            None,
            f"GET services/{service}:{DASHBOARD_PORT_NAME}/proxy/{SERVE_STATUS_PATH}: {exc.status} {exc.reason}",
        )
    except (ValueError, OSError) as exc:
        return None, f"Serve status through services/{service}: {exc}"


__all__ = ["ClusterUnreachable", "collect"]
