"""The compiled parts of a routing decision: the cache-aware policy's per-replica scoring
loop (cluster/routing/_replica_scores.c) and the prefix index's lookup
(cluster/routing/_prefix_match.c). Optional: where they cannot be built (no C compiler
or Python headers) the install goes on and the Python versions decide, equally."""

from setuptools import Extension, setup

# No fused multiply-add: the same roundings as the Python version, bit for bit.
FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math"]

setup(
    ext_modules=[
        Extension(name, [f"{name.replace('.', '/')}.c"], extra_compile_args=FLAGS, optional=True)
        for name in ("cluster.routing._replica_scores", "cluster.routing._prefix_match")
    ]
)
