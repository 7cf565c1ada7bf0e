"""Everything we use from Ray and vLLM that is not their public, stable API, one module per
upstream, each checking the version it was written against. A Ray or vLLM upgrade breaks
here, in one place, with a message naming what moved (tests/test_upstream.py imports all).
"""

from __future__ import annotations

from importlib import metadata


def check_version(package: str, expected: str, *, dists: tuple[str, ...] = ()) -> str:
    """The installed version of `package`; warns (once per process) when it is not the
    version the shims were written for."""
    for name in dists or (package,):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if not version.startswith(expected):
            import warnings

            warnings.warn(
                f"{package} {version} is installed; cluster.upstream was written against {expected}: "
                f"re-check the private APIs listed in cluster/upstream/{package}.py",
                stacklevel=2,
            )
        return version
    raise ImportError(f"{package} is not installed (expected {expected})")
