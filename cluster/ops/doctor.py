"""`cluster doctor`: name what is wrong with a release and the runbook to open.

Pure functions over API objects as the Kubernetes API returns them (dicts in the API's
JSON shape: camelCase, timestamps as RFC 3339 strings), so the diagnosis is tested on
recorded objects without a cluster, Ray or the kubernetes client. The collector
(cluster/ops/doctor_collect.py) reads a live cluster into a `ClusterSnapshot`; `--save` writes
the same JSON the tests load.

Each check looks for one common failure, most specific evidence first (a container's
state, then the pod's conditions, then events), and states it with the objects involved.
Field names follow KubeRay v1.7 (ray-operator/apis/ray/v1), core/v1, policy/v1 and Ray
Serve's REST API (`GET /api/serve/applications/`, ray.serve.schema.ServeInstanceDetails).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

Severity = Literal["critical", "warning"]
Obj = dict[str, Any]

RUNBOOKS = "runbooks"
# Chart labels (helm/mistral-large-serve/templates/_helpers.tpl) and KubeRay's pod labels.
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
POOL_LABEL = "mistral-large-serve/pool"
RAY_CLUSTER_LABEL = "ray.io/cluster"
RAY_GROUP_LABEL = "ray.io/group"
# Ray worker pods: the pools' groups and the gateway group (its pods run ray-worker too).
WORKER_COMPONENTS = ("ray-worker", "ray-gateway")
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
AUTOSCALER_CONTAINER = "autoscaler"  # KubeRay's AutoscalerContainerName
WEIGHTS_INIT_CONTAINER = "fetch-weights"
WEIGHTS_VOLUME = "weights"  # mls.rayVolumes: a PVC (weights.source pvc) or the fetch's emptyDir
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# Serve's message for replicas waiting for resources (deployment_state.py, PENDING_ALLOCATION).
SERVE_PENDING_ALLOCATION = "to be scheduled"
ENGINE_PREFIX = "engine-"  # engine deployments are "engine-<pool>" (deployments/gateway.py)


@dataclass(frozen=True)
class Thresholds:
    """How long a state may last before it is a failure rather than a step of a rollout."""

    pending: timedelta = timedelta(minutes=5)  # a node may be on its way (cluster autoscaler)
    not_ready: timedelta = timedelta(minutes=10)  # raylet and the Serve proxy are up within minutes


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str  # stable identifier, e.g. "gpu-pods-pending"
    summary: str
    runbook: str  # path under the repository, e.g. "runbooks/pods-pending.md"
    objects: tuple[str, ...] = ()  # "pod/<name>", "raycluster/<name>", ...
    evidence: tuple[str, ...] = ()

    def render(self) -> str:
        lines = [f"[{self.severity.upper()}] {self.code}: {self.summary}"]
        if self.objects:
            lines.append(f"    objects:  {', '.join(self.objects)}")
        lines += [f"    evidence: {e}" for e in self.evidence]
        lines.append(f"    runbook:  {self.runbook}")
        return "\n".join(lines)


@dataclass
class ClusterSnapshot:
    """What the doctor reads about one release, as the API returned it."""

    namespace: str
    release: str
    captured_at: datetime
    rayservice: Obj | None = None
    rayclusters: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    events: list[Obj] = field(default_factory=list)
    pdbs: list[Obj] = field(default_factory=list)
    serve: Obj | None = None  # ServeInstanceDetails JSON, None when it could not be read
    serve_error: str | None = None  # why the Serve status could not be read

    def to_json(self) -> Obj:
        out = asdict(self)
        out["captured_at"] = self.captured_at.isoformat()
        return out

    @classmethod
    def from_json(cls, data: Obj) -> ClusterSnapshot:
        data = dict(data)
        data["captured_at"] = parse_time(data["captured_at"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> ClusterSnapshot:
        return cls.from_json(json.loads(path.read_text()))


def parse_time(value: str) -> datetime:
    """RFC 3339 as the API writes it ("2026-12-01T10:00:00Z")."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def rayservice_name(release: str) -> str:
    """The chart's fullname (mls.fullname in _helpers.tpl) without fullnameOverride."""
    full = release if "mistral-large-serve" in release else f"{release}-mistral-large-serve"
    return full[:40].rstrip("-")


# ---- object helpers ------------------------------------------------------------------


def _name(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("name", "?"))


def _labels(obj: Obj) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})


def _condition(obj: Obj, kind: str) -> Obj | None:
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


def _age(since: str | None, now: datetime) -> timedelta:
    return now - parse_time(since) if since else timedelta(0)


def _container_statuses(pod: Obj, *, init: bool = False) -> list[Obj]:
    key = "initContainerStatuses" if init else "containerStatuses"
    return list(pod.get("status", {}).get(key) or [])


def _component(pod: Obj) -> str:
    return _labels(pod).get(COMPONENT_LABEL, "")


def _requests_gpus(pod: Obj) -> bool:
    for c in pod.get("spec", {}).get("containers") or []:
        res = c.get("resources") or {}
        for part in ("limits", "requests"):
            if any(k.endswith("/gpu") and str(v) not in ("0", "") for k, v in (res.get(part) or {}).items()):
                return True
    return False


def _events_for(events: Iterable[Obj], kind: str, name: str) -> list[Obj]:
    return [
        e for e in events if e.get("involvedObject", {}).get("kind") == kind and e["involvedObject"].get("name") == name
    ]


def _event_text(e: Obj) -> str:
    count = e.get("count")
    times = f" (x{count})" if count and int(count) > 1 else ""
    return f"event {e.get('reason')}{times}: {str(e.get('message', '')).strip()[:300]}"


def _states(status: Obj) -> Iterator[tuple[str, Obj]]:
    """(which, state) for the current and the last state of a container status."""
    for which in ("state", "lastState"):
        for kind, detail in (status.get(which) or {}).items():
            yield f"{which}.{kind}", dict(detail or {}, kind=kind)


def _ray_pods(snap: ClusterSnapshot) -> list[Obj]:
    return [p for p in snap.pods if _component(p) == "ray-head" or _component(p) in WORKER_COMPONENTS]


def _obj_ref(pod: Obj) -> str:
    return f"pod/{_name(pod)}"


# ---- checks --------------------------------------------------------------------------


def check_rayservice(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    rs = snap.rayservice
    if rs is None:
        return [
            Finding(
                "critical",
                "rayservice-missing",
                f"no RayService {rayservice_name(snap.release)} in namespace {snap.namespace}",
                f"{RUNBOOKS}/README.md",
                evidence=("helm status / helm list -n <namespace>: is the release installed here?",),
            )
        ]
    ready = _condition(rs, "Ready")
    if ready is None or ready.get("status") == "True":
        return []
    return [
        Finding(
            "critical",
            "rayservice-not-ready",
            f"RayService {_name(rs)} is not Ready ({ready.get('reason', '?')}): no Serve endpoint takes traffic",
            f"{RUNBOOKS}/rayservice-not-ready.md",
            objects=(f"rayservice/{_name(rs)}",),
            evidence=(
                f"condition Ready=False, reason {ready.get('reason', '?')}"
                + (f": {ready['message']}" if ready.get("message") else ""),
            ),
        )
    ]


def check_image_pulls(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    hits: list[str] = []
    evidence: list[str] = []
    for pod in snap.pods:
        for cs in _container_statuses(pod, init=True) + _container_statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in IMAGE_PULL_REASONS:
                hits.append(_obj_ref(pod))
                evidence.append(
                    f"{_name(pod)}/{cs.get('name')}: {waiting['reason']} {cs.get('image', '')}: "
                    f"{str(waiting.get('message', '')).strip()[:300]}"
                )
                evidence += [
                    _event_text(e)
                    for e in _events_for(snap.events, "Pod", _name(pod))
                    if e.get("reason") == "Failed" and "pull" in str(e.get("message", "")).lower()
                ][:1]
                break
    if not hits:
        return []
    return [
        Finding(
            "critical",
            "image-pull-failing",
            f"{len(hits)} pod(s) cannot pull their image",
            f"{RUNBOOKS}/image-pull.md",
            objects=tuple(hits),
            evidence=tuple(evidence),
        )
    ]


def _weights_claim(pod: Obj) -> str | None:
    for v in pod.get("spec", {}).get("volumes") or []:
        if v.get("name") == WEIGHTS_VOLUME and "persistentVolumeClaim" in v:
            return str(v["persistentVolumeClaim"].get("claimName"))
    return None


def _weights_unavailable(pod: Obj, events: list[Obj]) -> list[str]:
    """Why the pod cannot get its weights: the fetch init container fails (objectStore), or
    the weights volume cannot be bound, attached or mounted (pvc)."""
    out = []
    initialized = (_condition(pod, "Initialized") or {}).get("status") == "True"
    for cs in _container_statuses(pod, init=True):
        if cs.get("name") != WEIGHTS_INIT_CONTAINER or initialized:
            continue  # a fetch that failed before and then completed is not failing
        for which, st in _states(cs):
            if st["kind"] == "terminated" and int(st.get("exitCode", 0)) != 0:
                out.append(
                    f"{_name(pod)}/{WEIGHTS_INIT_CONTAINER} {which}: exit {st.get('exitCode')} "
                    f"{st.get('reason', '')} {str(st.get('message', '')).strip()[:300]}".rstrip()
                    + f", restarts {cs.get('restartCount', 0)}"
                )
                break
    claim = _weights_claim(pod)
    if claim is None or pod.get("status", {}).get("phase") != "Pending":
        return out
    scheduled = _condition(pod, "PodScheduled") or {}
    if scheduled.get("status") == "False" and claim in str(scheduled.get("message", "")):
        out.append(f"{_name(pod)}: unschedulable on its weights claim {claim}: {scheduled.get('message', '')}")
    volume_events = [
        e
        for e in _events_for(events, "Pod", _name(pod))
        if e.get("reason") in ("FailedMount", "FailedAttachVolume")
        and (
            f"[{WEIGHTS_VOLUME}" in str(e.get("message", ""))
            or claim in str(e.get("message", ""))
            or "Multi-Attach" in str(e.get("message", ""))
        )
    ]
    if volume_events:
        out.append(f"{_name(pod)}: weights volume (claim {claim}) not mounted")
        out += [_event_text(e) for e in volume_events[-2:]]
    return out


def check_weights_fetch(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    hits: list[str] = []
    evidence: list[str] = []
    for pod in _ray_pods(snap):
        why = _weights_unavailable(pod, snap.events)
        if why:
            hits.append(_obj_ref(pod))
            evidence += why
    if not hits:
        return []
    return [
        Finding(
            "critical",
            "weights-fetch-failing",
            f"{len(hits)} Ray pod(s) cannot get the model weights: their engines never start",
            f"{RUNBOOKS}/weights-fetch.md",
            objects=tuple(hits),
            evidence=tuple(evidence),
        )
    ]


def check_head_oom(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    findings = []
    for pod in snap.pods:
        if _component(pod) != "ray-head":
            continue
        for cs in _container_statuses(pod):
            if cs.get("name") != HEAD_CONTAINER:
                continue
            for which, st in _states(cs):
                if st["kind"] == "terminated" and st.get("reason") == "OOMKilled":
                    limit = _memory_limit(pod, HEAD_CONTAINER)
                    findings.append(
                        Finding(
                            "critical",
                            "head-oomkilled",
                            f"the head container was OOMKilled (memory limit {limit}): GCS, the Serve controller "
                            "and the gateway went with it",
                            f"{RUNBOOKS}/head-oomkilled.md",
                            objects=(_obj_ref(pod),),
                            evidence=(
                                f"{_name(pod)}/{HEAD_CONTAINER} {which}: OOMKilled at {st.get('finishedAt', '?')}, "
                                f"exit {st.get('exitCode')}, restarts {cs.get('restartCount', 0)}, "
                                f"pod phase {pod.get('status', {}).get('phase')}",
                            ),
                        )
                    )
                    break
    return findings


def _memory_limit(pod: Obj, container: str) -> str:
    for c in pod.get("spec", {}).get("containers") or []:
        if c.get("name") == container:
            return str(((c.get("resources") or {}).get("limits") or {}).get("memory", "none"))
    return "none"


def check_pending_gpu_pods(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    objects: list[str] = []
    evidence: list[str] = []
    oldest = timedelta(0)
    for pod in snap.pods:
        if pod.get("status", {}).get("phase") != "Pending" or not _requests_gpus(pod):
            continue
        scheduled = _condition(pod, "PodScheduled")
        if scheduled is None or scheduled.get("status") != "False" or scheduled.get("reason") != "Unschedulable":
            continue
        claim = _weights_claim(pod)
        if claim and claim in str(scheduled.get("message", "")):
            continue  # the weights volume, not GPU capacity: check_weights_fetch names it
        age = _age(scheduled.get("lastTransitionTime") or pod["metadata"].get("creationTimestamp"), snap.captured_at)
        oldest = max(oldest, age)
        objects.append(_obj_ref(pod))
        evidence.append(f"{_name(pod)}: unschedulable for {_minutes(age)}: {scheduled.get('message', '')}")
        scale = [
            e
            for e in _events_for(snap.events, "Pod", _name(pod))
            if e.get("reason") in ("NotTriggerScaleUp", "TriggeredScaleUp", "FailedScaleUp")
        ]
        evidence += [_event_text(e) for e in scale[-1:]]
    if not objects:
        return []
    return [
        Finding(
            "critical" if oldest >= th.pending else "warning",
            "gpu-pods-pending",
            f"{len(objects)} GPU pod(s) wait for a node with free GPUs (longest {_minutes(oldest)})",
            f"{RUNBOOKS}/pods-pending.md",
            objects=tuple(objects),
            evidence=tuple(evidence),
        )
    ]


def check_workers_not_ready(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    objects: list[str] = []
    evidence: list[str] = []
    for pod in snap.pods:
        if _component(pod) not in WORKER_COMPONENTS or pod.get("status", {}).get("phase") != "Running":
            continue
        ready = _condition(pod, "Ready")
        if ready is None or ready.get("status") == "True":
            continue
        age = _age(ready.get("lastTransitionTime"), snap.captured_at)
        if age < th.not_ready:
            continue
        running = any(
            cs.get("name") == WORKER_CONTAINER and "running" in (cs.get("state") or {})
            for cs in _container_statuses(pod)
        )
        if not running:
            continue  # a crashing container: check_crashes names it
        objects.append(_obj_ref(pod))
        evidence.append(f"{_name(pod)}: Running but not Ready for {_minutes(age)} ({ready.get('reason', '')})")
        probes = [
            e
            for e in _events_for(snap.events, "Pod", _name(pod))
            if e.get("reason") == "Unhealthy" and "eadiness" in str(e.get("message", ""))
        ]
        evidence += [_event_text(e) for e in probes[-1:]]
    if not objects:
        return []
    return [
        Finding(
            "critical",
            "workers-not-ready",
            f"{len(objects)} Ray worker pod(s) run but stay NotReady: Services and PodDisruptionBudgets count "
            "them unavailable",
            f"{RUNBOOKS}/workers-not-ready.md",
            objects=tuple(objects),
            evidence=tuple(evidence),
        )
    ]


def check_redis(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    redis = [p for p in snap.pods if _component(p) == "redis"]
    if not redis:
        return []  # external Redis: the exporter's redis_up alert covers it
    ready = [p for p in redis if (_condition(p, "Ready") or {}).get("status") == "True"]
    if len(ready) == len(redis):
        return []
    evidence: list[str] = []
    for pod in redis:
        if pod in ready:
            continue
        phase = pod.get("status", {}).get("phase")
        detail = []
        for cs in _container_statuses(pod):
            for which, st in _states(cs):
                if st["kind"] in ("waiting", "terminated") and st.get("reason"):
                    detail.append(f"{cs.get('name')} {which}: {st['reason']}")
        scheduled = _condition(pod, "PodScheduled")
        if scheduled and scheduled.get("status") == "False":
            detail.append(f"unschedulable: {scheduled.get('message', '')}")
        evidence.append(f"{_name(pod)}: phase {phase}, not Ready" + (f" ({'; '.join(detail)})" if detail else ""))
        evidence += [_event_text(e) for e in _events_for(snap.events, "Pod", _name(pod)) if e.get("type") == "Warning"][
            -2:
        ]
    all_down = not ready
    return [
        Finding(
            "critical" if all_down else "warning",
            "redis-down" if all_down else "redis-degraded",
            "no Redis pod is Ready: stateful requests (X-Session-ID) get 503"
            if all_down
            else f"{len(redis) - len(ready)} of {len(redis)} Redis pods are not Ready",
            f"{RUNBOOKS}/redis-down.md",
            objects=tuple(_obj_ref(p) for p in redis if p not in ready),
            evidence=tuple(evidence),
        )
    ]


def check_crashes(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    """Ray containers in CrashLoopBackOff that no more specific check explains."""
    objects: list[str] = []
    evidence: list[str] = []
    for pod in _ray_pods(snap):
        for cs in _container_statuses(pod):
            if cs.get("name") not in (HEAD_CONTAINER, WORKER_CONTAINER):
                continue
            waiting = (cs.get("state") or {}).get("waiting") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") != "CrashLoopBackOff" or last.get("reason") == "OOMKilled":
                continue
            objects.append(_obj_ref(pod))
            evidence.append(
                f"{_name(pod)}/{cs.get('name')}: CrashLoopBackOff, last exit {last.get('exitCode', '?')} "
                f"{last.get('reason', '')}, restarts {cs.get('restartCount', 0)}"
            )
    if not objects:
        return []
    return [
        Finding(
            "critical",
            "ray-container-crashing",
            f"{len(objects)} Ray container(s) crash on start",
            f"{RUNBOOKS}/replica-restarts.md",
            objects=tuple(objects),
            evidence=tuple(evidence),
        )
    ]


def _worker_groups(snap: ClusterSnapshot) -> list[Obj]:
    if snap.rayservice is None:
        return []
    return list(snap.rayservice.get("spec", {}).get("rayClusterConfig", {}).get("workerGroupSpecs") or [])


def check_autoscaler(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    findings: list[Finding] = []
    # 1. The autoscaler sidecar itself is down.
    for pod in snap.pods:
        if _component(pod) != "ray-head":
            continue
        for cs in _container_statuses(pod):
            if cs.get("name") != AUTOSCALER_CONTAINER:
                continue
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if "running" not in (cs.get("state") or {}) and pod.get("status", {}).get("phase") == "Running":
                findings.append(
                    Finding(
                        "critical",
                        "autoscaler-down",
                        "the KubeRay autoscaler sidecar of the head is not running: no GPU node is added or removed",
                        f"{RUNBOOKS}/autoscaler-stuck.md",
                        objects=(_obj_ref(pod),),
                        evidence=(
                            f"{_name(pod)}/{AUTOSCALER_CONTAINER}: {waiting.get('reason', 'not running')}, "
                            f"restarts {cs.get('restartCount', 0)}",
                        ),
                    )
                )
    # 2. KubeRay cannot create the pods the autoscaler asked for (quota, admission webhooks).
    for rc in snap.rayclusters:
        failed = [
            e for e in _events_for(snap.events, "RayCluster", _name(rc)) if e.get("reason") == "FailedToCreateWorkerPod"
        ]
        if failed:
            findings.append(
                Finding(
                    "critical",
                    "worker-pod-creation-failing",
                    f"KubeRay cannot create worker pods for {_name(rc)}",
                    f"{RUNBOOKS}/autoscaler-stuck.md",
                    objects=(f"raycluster/{_name(rc)}",),
                    evidence=tuple(_event_text(e) for e in failed[-2:]),
                )
            )
    # 3. Serve waits for resources, yet no worker pod is starting and the pool's groups have room.
    waiting = _deployments_waiting_for_resources(snap)
    if waiting and not any(_starting(p, snap.captured_at, th) for p in snap.pods if _component(p) in WORKER_COMPONENTS):
        groups = _worker_groups(snap)
        pods_per_group = {g["groupName"]: 0 for g in groups}
        for p in snap.pods:
            g = _labels(p).get(RAY_GROUP_LABEL)
            if g in pods_per_group and p.get("status", {}).get("phase") in ("Pending", "Running"):
                pods_per_group[g] += 1
        wanted = [g for g in groups if _pool_of_group(g) in {_pool_of_deployment(d) for d, _ in waiting}] or groups
        room = [g for g in wanted if pods_per_group[g["groupName"]] < int(g.get("maxReplicas", 0))]
        objects = tuple(f"deployment/{d}" for d, _ in waiting)
        evidence = tuple(m for _, m in waiting)
        if room:
            sizes = ", ".join(
                f"{g['groupName']} has {pods_per_group[g['groupName']]}/{g['maxReplicas']} pods" for g in room
            )
            findings.append(
                Finding(
                    "critical",
                    "autoscaler-stuck",
                    f"Serve replicas wait for resources but no worker pod is being created, although {sizes}",
                    f"{RUNBOOKS}/autoscaler-stuck.md",
                    objects=objects,
                    evidence=evidence,
                )
            )
        else:
            findings.append(
                Finding(
                    "warning",
                    "pools-at-max-pods",
                    "Serve replicas wait for resources and their worker groups are at maxReplicas: "
                    + ", ".join(g["groupName"] for g in wanted),
                    f"{RUNBOOKS}/queue-growing.md",
                    objects=objects,
                    evidence=evidence,
                )
            )
    return findings


def _starting(pod: Obj, now: datetime, th: Thresholds) -> bool:
    """Pending, or Running and not Ready for less than the NotReady threshold (raylet joining)."""
    phase = pod.get("status", {}).get("phase")
    if phase == "Pending":
        return True
    ready = _condition(pod, "Ready") or {}
    return (
        phase == "Running"
        and ready.get("status") != "True"
        and _age(ready.get("lastTransitionTime"), now) < th.not_ready
    )


def _pool_of_group(group: Obj) -> str | None:
    return ((group.get("template") or {}).get("metadata") or {}).get("labels", {}).get(POOL_LABEL)


def _pool_of_deployment(name: str) -> str | None:
    """The pool of an engine deployment, named by deployments.gateway.engine_deployment_name."""
    deployment = name.rsplit("/", 1)[-1]
    return deployment.removeprefix(ENGINE_PREFIX) if deployment.startswith(ENGINE_PREFIX) else None


def _deployments_waiting_for_resources(snap: ClusterSnapshot) -> list[tuple[str, str]]:
    out = []
    for app in ((snap.serve or {}).get("applications") or {}).values():
        for name, dep in (app.get("deployments") or {}).items():
            message = str(dep.get("message", ""))
            if SERVE_PENDING_ALLOCATION in message:
                out.append((f"{app.get('name')}/{name}", message[:400]))
    return out


def check_serve(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    if snap.serve is None:
        if snap.rayservice is None:
            return []
        return [
            Finding(
                "warning",
                "serve-status-unavailable",
                "could not read the Serve status through the head (dashboard port 8265)",
                f"{RUNBOOKS}/head-down.md",
                evidence=(snap.serve_error or "no detail",),
            )
        ]
    findings = []
    for app in (snap.serve.get("applications") or {}).values():
        bad = {
            name: dep
            for name, dep in (app.get("deployments") or {}).items()
            if dep.get("status") in ("UNHEALTHY", "DEPLOY_FAILED")
        }
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") or bad:
            evidence = [f"application {app.get('name')}: {app.get('status')} {str(app.get('message', ''))[:300]}"]
            evidence += [f"deployment {n}: {d.get('status')} {str(d.get('message', ''))[:300]}" for n, d in bad.items()]
            findings.append(
                Finding(
                    "critical",
                    "serve-deployment-unhealthy",
                    f"Serve application {app.get('name')} is {app.get('status')}"
                    + (f"; unhealthy deployments: {', '.join(bad)}" if bad else ""),
                    # A config that never deployed is the RayService's page; replicas that
                    # stopped being healthy are the availability alert's.
                    f"{RUNBOOKS}/rayservice-not-ready.md"
                    if app.get("status") == "DEPLOY_FAILED"
                    else f"{RUNBOOKS}/deployment-unavailable.md",
                    objects=tuple(f"deployment/{app.get('name')}/{n}" for n in bad),
                    evidence=tuple(evidence),
                )
            )
    proxies = snap.serve.get("proxies") or {}
    unhealthy = {node: p for node, p in proxies.items() if p.get("status") == "UNHEALTHY"}
    if proxies and len(unhealthy) == len(proxies):
        findings.append(
            Finding(
                "critical",
                "serve-proxy-unhealthy",
                "no healthy Serve proxy: HTTP requests are not accepted",
                f"{RUNBOOKS}/workers-not-ready.md",
                evidence=tuple(f"proxy on {p.get('node_ip', node)}: UNHEALTHY" for node, p in unhealthy.items()),
            )
        )
    return findings


def check_disruption_budgets(snap: ClusterSnapshot, th: Thresholds) -> list[Finding]:
    """PDBs that allow no eviction although every pod they cover is healthy: drains stall."""
    objects: list[str] = []
    evidence: list[str] = []
    for pdb in snap.pdbs:
        st = pdb.get("status") or {}
        allowed = int(st.get("disruptionsAllowed", 0))
        healthy, desired, expected = (int(st.get(k, 0)) for k in ("currentHealthy", "desiredHealthy", "expectedPods"))
        cond = _condition(pdb, "DisruptionAllowed") or {}
        if allowed > 0:
            continue
        if cond.get("reason") == "SyncFailed" or (expected > 0 and healthy >= expected):
            objects.append(f"poddisruptionbudget/{_name(pdb)}")
            evidence.append(
                f"{_name(pdb)}: disruptionsAllowed 0 with {healthy}/{expected} pods healthy (desired {desired})"
                + (f"; {cond.get('reason')}: {cond.get('message', '')}" if cond.get("reason") else "")
            )
    if not objects:
        return []
    return [
        Finding(
            "warning",
            "pdb-blocks-drains",
            f"{len(objects)} PodDisruptionBudget(s) allow no eviction while their pods are healthy: "
            "node drains and upgrades stall",
            f"{RUNBOOKS}/drain-blocked.md",
            objects=tuple(objects),
            evidence=tuple(evidence),
        )
    ]


# Most specific first: a cause (head OOMKilled) is listed before its symptom (RayService not Ready).
CHECKS = (
    check_image_pulls,
    check_weights_fetch,
    check_head_oom,
    check_crashes,
    check_pending_gpu_pods,
    check_workers_not_ready,
    check_autoscaler,
    check_redis,
    check_serve,
    check_disruption_budgets,
    check_rayservice,
)


def diagnose(snap: ClusterSnapshot, thresholds: Thresholds | None = None) -> list[Finding]:
    """Every finding, critical first (then in check order)."""
    th = thresholds or Thresholds()
    found = [f for check in CHECKS for f in check(snap, th)]
    return sorted(found, key=lambda f: f.severity != "critical")


def report(snap: ClusterSnapshot, findings: list[Finding]) -> str:
    head = (
        f"cluster doctor: release {snap.release} in namespace {snap.namespace} at {snap.captured_at:%Y-%m-%d %H:%M:%SZ}"
    )
    counts = (
        f"{len(snap.rayclusters)} RayCluster(s), {len(snap.pods)} pod(s), {len(snap.events)} event(s), "
        f"{len(snap.pdbs)} PDB(s), Serve status {'read' if snap.serve is not None else 'unavailable'}"
    )
    if not findings:
        return f"{head}\n{counts}\nno known failure found"
    return "\n".join([head, counts, "", *(f.render() for f in findings)])


def _minutes(d: timedelta) -> str:
    return f"{int(d.total_seconds() // 60)} min"


__all__ = ["CHECKS", "ClusterSnapshot", "Finding", "Thresholds", "diagnose", "parse_time", "rayservice_name", "report"]
