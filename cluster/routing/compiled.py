"""The compiled parts of a routing decision, found in one place: `setup.py` builds them
(optionally: without a C compiler the install goes on) next to their Python versions,
which are their specifications (`replica_scores.score_replicas_py`,
`PrefixIndex.match_many`'s grouped search). `MLS_PURE_PYTHON_ROUTING=1` makes the router
use the Python versions even where the compiled ones were built."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def extension(name: str) -> ModuleType | None:
    """`cluster.routing.<name>` where it was built, else None."""
    try:
        return importlib.import_module(f"cluster.routing.{name}")
    except ImportError:
        return None


def use_compiled() -> bool:
    """Whether the router should use a compiled part it has (the environment's switch)."""
    return os.environ.get("MLS_PURE_PYTHON_ROUTING", "") in ("", "0")


__all__ = ["extension", "use_compiled"]
