"""The runbooks match the chart: every runbook starts with `cluster doctor`, and every kubectl
command in runbooks/ names resources, label selectors, containers and spec paths that the
rendered manifests (every example, and H100 with every optional feature) really have.

Pods are the rendered pod templates with the labels KubeRay adds (labelPod in
ray-operator/controllers/ray/common/pod.go: template labels win except ray.io/node-type,
ray.io/group, ray.io/cluster) and, on the head, KubeRay's `autoscaler` sidecar when in-tree
autoscaling is on. RayClusters are the RayService's rayClusterConfig with the labels KubeRay
puts on the clusters a RayService owns (ray.io/originated-from-crd, -cr-name). Services are
the rendered ones plus KubeRay's head Service and the RayService's serveService; each has
EndpointSlices labelled kubernetes.io/service-name (the EndpointSlice controller's label).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.ops.helm_values import render_helm_values_yaml
from tests import helm_tools
from tests.test_helm import EXAMPLES, EXAMPLES_DIR, NAMESPACE, RELEASE, SITE_ALL_FEATURES, ray_templates, render
from tests.test_helm_resilience import SITE_SENTINEL, sentinel_config

RUNBOOKS = helm_tools.REPO / "runbooks"
FULLNAME = f"{RELEASE}-mistral-large-serve"
# The variables runbooks/README.md defines, and the placeholders the runbooks use for them.
VARIABLES = {"$NS": NAMESPACE, "<namespace>": NAMESPACE, "$RELEASE": RELEASE, "<release>": RELEASE, "$RS": FULLNAME}
HEAD_VAR = "$HEAD"  # a head pod (README: HEAD=$(kubectl get pod -l ...component=ray-head ...))
KIND_ALIASES = {
    "pod": "Pod", "pods": "Pod", "po": "Pod",
    "rayservice": "RayService", "rayservices": "RayService",
    "raycluster": "RayCluster", "rayclusters": "RayCluster",
    "pdb": "PodDisruptionBudget", "poddisruptionbudget": "PodDisruptionBudget",
    "svc": "Service", "service": "Service", "services": "Service",
    "deploy": "Deployment", "deployment": "Deployment", "deployments": "Deployment",
    "sts": "StatefulSet", "statefulset": "StatefulSet",
    "cm": "ConfigMap", "configmap": "ConfigMap", "secret": "Secret", "secrets": "Secret",
    "pvc": "PersistentVolumeClaim", "persistentvolumeclaim": "PersistentVolumeClaim",
    "networkpolicy": "NetworkPolicy", "netpol": "NetworkPolicy",
    "endpointslice": "EndpointSlice", "endpointslices": "EndpointSlice",
}  # fmt: skip
# Kinds the release does not create (cluster objects, other namespaces): names not checked.
FOREIGN_KINDS = {"node", "nodes", "events", "event", "resourcequota", "namespace", "ns"}
VERBS_WITH_RESOURCE = {"get", "describe", "delete", "logs", "exec", "edit", "rollout", "port-forward", "top"}


@dataclass
class Pod:
    source: str  # "ray/head", "StatefulSet/<name>", ...
    labels: dict[str, str]
    containers: set[str]


@dataclass
class Release:
    """What a release creates, directly or through KubeRay, across the rendered variants."""

    objects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # kind -> objects
    pods: list[Pod] = field(default_factory=list)

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.objects.get(kind, [])}

    def add(self, kind: str, obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] not in self.names(kind):
            self.objects.setdefault(kind, []).append(obj)


def _derive(docs: list[dict[str, Any]], release: Release) -> None:
    for doc in docs:
        release.add(doc["kind"], doc)
        if doc["kind"] in ("StatefulSet", "Deployment"):
            spec = doc["spec"]["template"]["spec"]
            release.pods.append(
                Pod(
                    f"{doc['kind']}/{doc['metadata']['name']}",
                    dict(doc["spec"]["template"]["metadata"].get("labels", {})),
                    {c["name"] for c in spec.get("initContainers", []) + spec["containers"]},
                )
            )
            for claim in doc["spec"].get("volumeClaimTemplates", []):
                for i in range(int(doc["spec"].get("replicas", 1))):
                    pvc = {"metadata": {"name": f"{claim['metadata']['name']}-{doc['metadata']['name']}-{i}"}}
                    release.add("PersistentVolumeClaim", pvc)
        if doc["kind"] == "RayService":
            name = doc["metadata"]["name"]
            cluster_config = doc["spec"]["rayClusterConfig"]
            release.add(
                "RayCluster",
                {
                    "metadata": {
                        "name": f"{name}-xxxxx",
                        "labels": {"ray.io/originated-from-crd": "RayService", "ray.io/originated-from-cr-name": name},
                    },
                    "spec": cluster_config,
                },
            )
            release.add("Service", {"metadata": {"name": f"{name}-head-svc"}})  # KubeRay's head Service
            release.add("Service", {"metadata": dict(doc["spec"]["serveService"]["metadata"])})
            for group, template in ray_templates(doc).items():
                node_type = "head" if group == "head" else "worker"
                labels = {
                    "ray.io/is-ray-node": "yes",
                    "app.kubernetes.io/name": "kuberay",
                    "app.kubernetes.io/created-by": "kuberay-operator",
                    **template["metadata"].get("labels", {}),
                    "ray.io/node-type": node_type,
                    "ray.io/group": "headgroup" if group == "head" else group,
                }
                spec = template["spec"]
                containers = {c["name"] for c in spec.get("initContainers", []) + spec["containers"]}
                if node_type == "head" and cluster_config.get("enableInTreeAutoscaling"):
                    containers.add("autoscaler")  # KubeRay's AutoscalerContainerName
                release.pods.append(Pod(f"ray/{group}", labels, containers))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    helm = helm_tools.helm()
    directory = tmp_path_factory.mktemp("site")
    required = helm_tools.site_required_file(directory)
    site = directory / "all-features.yaml"
    site.write_text(yaml.safe_dump(SITE_ALL_FEATURES))
    stacks = [[EXAMPLES_DIR / name, required] for name in EXAMPLES]
    stacks.append([EXAMPLES_DIR / "h100x8-bf16.yaml", required, site])
    # The bundled Redis with Sentinels (redis-down.md's failover commands).
    sentinel_values = directory / "sentinel-generated.yaml"
    sentinel_values.write_text(render_helm_values_yaml(sentinel_config()))
    sentinel_site = directory / "sentinel-site.yaml"
    sentinel_site.write_text(yaml.safe_dump(SITE_SENTINEL))
    stacks.append([sentinel_values, sentinel_site])
    out = Release()
    for files in stacks:
        _derive(render(helm, files), out)
    for service in list(out.objects.get("Service", [])):
        svc = service["metadata"]["name"]
        out.add("EndpointSlice", {"metadata": {"name": f"{svc}-xxxxx", "labels": {"kubernetes.io/service-name": svc}}})
    return out


# ---------------------------------------------------------------- reading the runbooks


def runbook_files() -> list[Path]:
    return sorted(RUNBOOKS.glob("*.md"))


def code_spans(text: str) -> list[str]:
    """Shell lines of fenced blocks (continuations joined) and inline code spans, in order."""
    spans: list[tuple[int, str]] = []
    for m in re.finditer(r"^ *```[a-z]*\n(.*?)^ *```", text, re.S | re.M):
        body = m.group(1).replace("\\\n", " ")
        spans += [(m.start(), line.strip()) for line in body.splitlines() if line.strip()]
    fenced = [(m.start(), m.end()) for m in re.finditer(r"^ *```.*?^ *```", text, re.S | re.M)]
    for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", text):
        if not any(a <= m.start() < b for a, b in fenced):
            spans.append((m.start(), " ".join(m.group(1).split())))
    return [s for _, s in sorted(spans)]


def substitute(command: str) -> str:
    for var, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        command = command.replace(var, value)
    return command


def kubectl_commands(span: str) -> list[list[str]]:
    """Each kubectl invocation in a shell snippet, tokenized (pipes, `$(...)`, `&&` split)."""
    out = []
    for part in re.split(r"\$\(|\)|\|\||\||&&|;", substitute(span)):
        part = part.strip()
        idx = part.find("kubectl ")
        if idx == -1:
            continue
        try:
            tokens = shlex.split(part[idx:])
        except ValueError:
            tokens = part[idx:].split()
        if len(tokens) > 1:  # "`kubectl drain`" in prose names a verb, not a command
            out.append(tokens)
    return out


# ---------------------------------------------------------------- checking one command


@dataclass
class Command:
    tokens: list[str]
    namespace: str | None = None
    verb: str = ""
    positional: list[str] = field(default_factory=list)
    selector: str | None = None
    container: str | None = None
    jsonpath: str | None = None


def parse(tokens: list[str]) -> Command:
    cmd = Command(tokens)
    args = tokens[1:]
    if "--" in args:
        args = args[: args.index("--")]
    i = 0
    while i < len(args):
        t = args[i]
        value = args[i + 1] if i + 1 < len(args) else ""
        if t in ("-n", "--namespace"):
            cmd.namespace, i = value, i + 2
        elif t in ("-l", "--selector"):
            cmd.selector, i = value, i + 2
        elif t in ("-c", "--container"):
            cmd.container, i = value, i + 2
        elif t == "-o" and value.startswith("jsonpath="):
            cmd.jsonpath, i = value.removeprefix("jsonpath="), i + 2
        elif t in ("-o", "-L", "--field-selector", "--tail", "--since", "-f"):
            i += 1 if t == "-f" else 2
        elif t.startswith("-"):
            i += 1
        elif not cmd.verb:
            cmd.verb, i = t, i + 1
        else:
            cmd.positional.append(t)
            i += 1
    return cmd


def _selector_terms(selector: str) -> list[tuple[str, str, str | None]]:
    terms = []
    for term in selector.split(","):
        m = re.fullmatch(r"([\w./-]+)\s*(!=|==|=)?\s*([\w.-]*)", term.strip())
        assert m, f"cannot read label selector term {term!r}"
        key, op, value = m.group(1), m.group(2), m.group(3)
        terms.append((key, op or "exists", value if op else None))
    return terms


def matches(labels: dict[str, str], selector: str) -> bool:
    for key, op, value in _selector_terms(selector):
        if op == "exists" and key not in labels:
            return False
        if op in ("=", "==") and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
    return True


def jsonpath_values(obj: Any, path: str) -> list[Any]:
    """Enough JSONPath for runbooks: {.a.b[*].c[0]}. [] when the path does not exist."""
    steps = re.findall(r"\.([\w-]+)|\[(\*|\d+)\]", path.strip("{}"))
    values = [obj]
    for key, index in steps:
        nxt: list[Any] = []
        for v in values:
            if key and isinstance(v, dict) and key in v:
                nxt.append(v[key])
            elif index == "*" and isinstance(v, list):
                nxt += v
            elif index and index != "*" and isinstance(v, list) and int(index) < len(v):
                nxt.append(v[int(index)])
        values = nxt
    return values


def check(cmd: Command, release: Release) -> list[str]:
    """What in one kubectl command does not exist in the rendered release."""
    errors: list[str] = []
    if cmd.namespace is not None and cmd.namespace != NAMESPACE:
        errors.append(f"namespace {cmd.namespace!r} is not the README's $NS")
    if cmd.verb not in VERBS_WITH_RESOURCE or not cmd.positional:
        kind_token = ""
    else:
        kind_token = cmd.positional[0]
    kind_word, _, slash_name = kind_token.partition("/")
    if cmd.verb in ("logs", "exec") and not slash_name:
        kind_word, slash_name = "pod", kind_token  # `logs <pod>`, `exec $HEAD`
        names = [slash_name] if slash_name else []
    else:
        names = [slash_name] if slash_name else cmd.positional[1:]
    if kind_word.lower() in FOREIGN_KINDS or not kind_word:
        return errors
    kind = KIND_ALIASES.get(kind_word.lower())
    if kind is None:
        return [*errors, f"unknown resource type {kind_word!r}"]
    pods = release.pods
    candidates = release.objects.get(kind, [])
    if cmd.selector:
        if kind == "Pod":
            pods = [p for p in pods if matches(p.labels, cmd.selector)]
            if not pods:
                errors.append(f"selector {cmd.selector!r} matches no pod of the release")
        else:
            candidates = [o for o in candidates if matches(o["metadata"].get("labels") or {}, cmd.selector)]
            if not candidates:
                errors.append(f"selector {cmd.selector!r} matches no {kind} of the release")
    for name in names:
        if name.startswith("<") or name == HEAD_VAR:
            if name == HEAD_VAR:
                pods = [p for p in pods if p.source == "ray/head"]
            continue
        if kind == "Pod":
            errors.append(f"pod name {name!r}: pod names are generated, use a selector or a placeholder")
        elif name not in release.names(kind):
            errors.append(f"no {kind} named {name!r} in the rendered manifests")
        else:
            candidates = [o for o in candidates if o["metadata"]["name"] == name]
    if cmd.container and kind == "Pod" and not any(cmd.container in p.containers for p in pods):
        errors.append(f"container {cmd.container!r} is in none of {sorted({p.source for p in pods})}")
    if cmd.jsonpath and kind in ("RayService", "RayCluster") and ".status" not in cmd.jsonpath:
        path = cmd.jsonpath.replace(".items[*]", "", 1)
        if not any(jsonpath_values(o, path) for o in candidates):
            errors.append(f"jsonpath {cmd.jsonpath} selects nothing in the rendered {kind}")
    return errors


# ---------------------------------------------------------------- tests


def test_every_runbook_starts_with_cluster_doctor() -> None:
    assert runbook_files()
    for path in runbook_files():
        spans = code_spans(path.read_text())
        assert spans, f"{path.name} has no command"
        assert spans[0].startswith("cluster doctor --release $RELEASE -n $NS"), (
            f"{path.name}: the first command must be cluster doctor, found {spans[0]!r}"
        )


def test_every_runbook_is_linked_from_the_index() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    for path in runbook_files():
        if path.name != "README.md":
            assert f"]({path.name})" in index, f"runbooks/README.md does not link {path.name}"


@pytest.mark.parametrize("path", runbook_files(), ids=lambda p: p.name)
def test_kubectl_commands_match_the_rendered_manifests(path: Path, release: Release) -> None:
    commands = [c for span in code_spans(path.read_text()) for c in kubectl_commands(span)]
    errors = [f"{' '.join(c)}\n    -> {e}" for c in commands for e in check(parse(c), release)]
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_release_names_in_runbooks_exist(release: Release) -> None:
    """Object names written out in prose (`$RS-dashboard`, PVCs, the exporter) exist too."""
    every = set().union(*(release.names(k) for k in release.objects))
    found = 0
    for path in runbook_files():
        for span in code_spans(path.read_text()):
            for token in re.findall(
                rf"(?<![\w/-]){re.escape(FULLNAME)}[\w-]*|data-{re.escape(FULLNAME)}[\w-]*", substitute(span)
            ):
                found += 1
                assert token in every, f"{path.name}: {token!r} is not an object of the rendered release"
    assert found >= 3


def test_the_readme_head_selector_finds_exactly_the_head(release: Release) -> None:
    index = (RUNBOOKS / "README.md").read_text()
    (head_cmd,) = [c for span in code_spans(index) if span.startswith("HEAD=") for c in kubectl_commands(span)]
    selector = parse(head_cmd).selector
    assert selector is not None
    assert {p.source for p in release.pods if matches(p.labels, selector)} == {"ray/head"}


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("kubectl -n $NS get pod -l app.kubernetes.io/component=ray-heads", "matches no pod"),
        ("kubectl -n $NS logs $HEAD -c ray-worker", "container 'ray-worker' is in none of ['ray/head']"),
        ("kubectl -n $NS describe pdb $RS-gpu", "no PodDisruptionBudget named 'mls-mistral-large-serve-gpu'"),
        ("kubectl -n $NS get rayservice $RS -o jsonpath='{.spec.serveConfig}'", "selects nothing"),
        ("kubectl -n default get pods", "is not the README's $NS"),
        ("kubectl -n $NS get raycluster -l ray.io/originated-from-cr-name=mls", "matches no RayCluster"),
    ],
)
def test_the_check_catches_a_wrong_command(line: str, error: str, release: Release) -> None:
    (tokens,) = kubectl_commands(line)
    assert any(error in e for e in check(parse(tokens), release)), check(parse(tokens), release)
