"""The one compiled part: the routing policy's per-replica scoring loop
(cluster/routing/_replica_scores.c). Optional: where it cannot be built (no C compiler
or Python headers) the install goes on and the Python version decides, equally."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cluster.routing._replica_scores",
            ["cluster/routing/_replica_scores.c"],
            # No fused multiply-add: the same roundings as the Python version, bit for bit.
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
