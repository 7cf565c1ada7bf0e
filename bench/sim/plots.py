"""PNG plots of a policy comparison: latency versus load per policy, prefix-cache hit
rate per policy against the trace's ceiling, and SLO attainment versus load (the goodput
searches' runs) against the ceiling fleets'."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402


def _by_policy(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["policy"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["rate_scale"])
    return out


def plot_latency_vs_load(
    rows: Sequence[dict[str, Any]], path: Path, title: str, floor: dict[str, float] | None = None
) -> Path:
    """TTFT p50/p90/p99 and TPOT p99 against the arrival-rate scale, one line per policy;
    with `floor` (bench.sim.floor percentiles), the TTFT floor as a dashed black line:
    every request alone on an idle replica with perfect reuse, the same at every load."""
    panels = [
        ("ttft_p50_s", "TTFT p50 (s)"),
        ("ttft_p90_s", "TTFT p90 (s)"),
        ("ttft_p99_s", "TTFT p99 (s)"),
        ("tpot_p99_ms", "TPOT p99 (ms)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for policy, rs in _by_policy(rows).items():
            xs = [r["rate_scale"] for r in rs]
            ys = [r[key] for r in rs]
            ax.plot(xs, ys, marker="o", label=policy, linewidth=2.5 if policy == "cache-aware" else 1.2)
        if floor and key in floor:  # the floor's keys name the TTFT percentiles alike
            ax.axhline(floor[key], color="black", linestyle="--", linewidth=1.2, label="floor (perfect reuse)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("arrival rate (x trace rate)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hit_rate(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Block hit rate per policy (a bar per rate scale) with the perfect-reuse ceiling."""
    policies = list(_by_policy(rows))
    scales = sorted({r["rate_scale"] for r in rows})
    width = 0.8 / max(1, len(scales))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(policies)), 4.5))
    for k, scale in enumerate(scales):
        vals = []
        for p in policies:
            match = [r for r in rows if r["policy"] == p and r["rate_scale"] == scale]
            vals.append(100 * match[0]["block_hit_rate"] if match else 0.0)
        xs = [i + (k - (len(scales) - 1) / 2) * width for i in range(len(policies))]
        ax.bar(xs, vals, width=width, label=f"x{scale:g} rate")
    ceiling = max(r["block_hit_ceiling"] for r in rows) * 100
    ax.axhline(ceiling, color="black", linestyle="--", label=f"ceiling {ceiling:.1f}% (perfect reuse)")
    ax.set_xticks(range(len(policies)))
    ax.set_xticklabels(policies, rotation=20)
    ax.set_ylabel("prefix-cache block hit rate (%)")
    top = max([ceiling] + [100 * r["block_hit_rate"] for r in rows])
    ax.set_ylim(0, top * 1.35 + 1)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_slo_attainment(
    goodput: dict[str, Any], ceiling: dict[str, Any], path: Path, title: str, target: float
) -> Path:
    """SLO attainment against the rate scale, one line per policy (every run its goodput
    search made), the ceiling fleets dashed; the target as a dotted line, and where 1.3x
    the best peer's goodput lies."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, g in list(goodput.items()) + list(ceiling.items()):
        pts = sorted((float(s), a) for s, a in g["probes"].items())
        dashed = name in ceiling
        ax.plot(
            [s for s, _ in pts],
            [100 * a for _, a in pts],
            marker="." if dashed else "o",
            linestyle="--" if dashed else "-",
            linewidth=2.5 if name == "cache-aware" else 1.2,
            label=f"{name} (goodput x{g['rate_scale']:g})",
        )
    ax.axhline(100 * target, color="black", linestyle=":", linewidth=1.2, label=f"target {target:.0%}")
    best_peer = max((g["rate_scale"] for p, g in goodput.items() if p != "cache-aware"), default=0.0)
    if best_peer > 0:
        ax.axvline(1.3 * best_peer, color="grey", linestyle=":", linewidth=1.2, label="1.3x the best peer")
    ax.set_xlabel("arrival rate (x trace rate)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
