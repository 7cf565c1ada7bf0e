"""Step times of a whole engine, read off a table measured in the real engine.

The GPU step model (step_time.py) adds up layer kernels, because on a GPU a step is its
kernels. On the CPU backend a step of the tiny model is vLLM's own work as much as the
model's, so bench/calibration/profile_cpu_engine.py times whole engine steps of vLLM and
this model reads them back:

- `decode_ms` {batch, context}: a step in which `batch` sequences decode one token each
  over a mean context of `context` tokens;
- `prefill_ms` {chunk, context}: a step that prefills one chunk of `chunk` new tokens
  over `context` cached ones, the engine otherwise idle.

A step mixing both (continuous batching) is the decode cell plus, for every prefill
chunk, its cell's cost above the step's fixed part (`fixed_ms`, the smallest decode
cell: one token of work): the model's work adds, the step's fixed costs (scheduling,
the hand-off to the worker, sampling) are paid once. The profiler's mixed checks measure
how far that composition is off. Both tables are interpolated piecewise-linearly
(extrapolated linearly past the measured range) and made non-decreasing along every axis.

`scale` (the profile's `simulator.engine_step_scale`) stretches every step: the table
holds the engine measured alone, while in a serving cluster on the same few cores the
engine shares them with its own frontend, the gateway, the proxy and whatever else the
machine runs (`cluster bench replay --engine-timing` measures the ratio from the
engine's own step intervals during a replay). `prefill_scale` (the profile's
`simulator.engine_prefill_scale`) stretches the prefill chunks' part of a step further,
where the machine's prefill differs from its decode against the table.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.calibration.step_time import CALIBRATION_DIR, Grid2D, interp1
from bench.sim.spread import Spread
from cluster.architecture import ModelArchitecture
from cluster.config import ClusterConfig, PoolConfig

log = logging.getLogger(__name__)


def engine_table_name(profile: str) -> str:
    return f"engine_steps_{profile.replace('-', '_')}.json"


class EngineStepTable:
    """StepTime from measured whole-engine steps (one replica of a CPU pool)."""

    source = "measured-engine"

    def __init__(
        self,
        table: dict[str, Any],
        name: str = "table",
        scale: float = 1.0,
        scale_spread: Sequence[float] = (),
        scale_autocorr: float = 0.0,
        prefill_scale: float = 1.0,
    ) -> None:
        if scale <= 0 or prefill_scale <= 0:
            raise ValueError(f"step scales must be positive, got {scale} and {prefill_scale}")
        self.prefill_scale = prefill_scale
        self.table = table
        self.name = name
        self.scale = scale
        # A measured spread of the scale: each step draws its own (bench/sim/spread.py),
        # correlated with the step before by `scale_autocorr`.
        self._seed: int | str = 0
        self._spread = Spread(scale_spread, autocorr=scale_autocorr) if scale_spread else None
        self._decode = Grid2D.from_json(table["decode_ms"], "batch")
        self._prefill = Grid2D.from_json(table["prefill_ms"], "chunk")
        self.fixed_ms = self._decode.ms[0][0]
        self._decode_rows: dict[int, list[float]] = {}
        self.notes = [f"engine step table {name} (vLLM {table.get('software', {}).get('vllm')}, {table.get('date')})"]

    @classmethod
    def load(
        cls,
        path: Path,
        arch: ModelArchitecture | None = None,
        scale: float = 1.0,
        scale_spread: Sequence[float] = (),
        scale_autocorr: float = 0.0,
        prefill_scale: float = 1.0,
    ) -> EngineStepTable:
        """The table at `path`; ValueError when it was measured for another architecture."""
        table = json.loads(path.read_text())
        measured = table.get("architecture")
        if arch is not None and measured is not None and ModelArchitecture.model_validate(measured) != arch:
            raise ValueError(f"{path.name} was measured for another model architecture")
        return cls(table, path.name, scale, scale_spread, scale_autocorr, prefill_scale)

    def reseed(self, seed: int | str) -> None:
        """Draw the step scales anew from `seed` (the simulation's own seed)."""
        self._seed = seed
        if self._spread is not None:
            self._spread = Spread(self._spread.quantiles, seed=seed, autocorr=self._spread.autocorr)

    def for_replica(self, key: str) -> EngineStepTable:
        """This table with step scales of its own for one replica (seeded from this one's
        seed and `key`). The measured correlation is between one replica's consecutive
        steps (`lag1_autocorr` pools per-replica series); one chain shared by a pool's
        replicas interleaves their draws, so each replica's own steps come out less
        correlated than measured."""
        twin = copy.copy(self)
        if self._spread is not None:
            q, ac = self._spread.quantiles, self._spread.autocorr
            twin._spread = Spread(q, seed=f"{self._seed}-{key}", autocorr=ac)
        return twin

    def decode_ms(self, batch: int, mean_context: float) -> float:
        row = self._decode_rows.get(batch)
        if row is None:
            row = self._decode.row_at(float(batch))
            self._decode_rows[batch] = row
        return max(self.fixed_ms, interp1(self._decode.cols, row, mean_context))

    def prefill_ms(self, chunk: int, context: int) -> float:
        return max(self.fixed_ms, self._prefill.at(float(chunk), float(context)))

    def step_ms(self, prefill_chunks: Sequence[tuple[int, int]], num_decode: int, decode_kv_tokens: int) -> float:
        if num_decode <= 0 and not prefill_chunks:
            return 0.0
        total = self.decode_ms(num_decode, decode_kv_tokens / num_decode) if num_decode > 0 else self.fixed_ms
        for new, ctx in prefill_chunks:
            total += self.prefill_scale * (self.prefill_ms(new, ctx) - self.fixed_ms)
        return total * (self._spread.draw() if self._spread is not None else self.scale)

    @property
    def is_analytic(self) -> bool:
        return False

    def describe(self) -> str:
        if self._spread is not None:
            scaled = f" x {self._spread.median:.2f} median, drawn per step (cores shared in the cluster)"
            if self._spread.autocorr:
                scaled += f", lag-1 correlation {self._spread.autocorr:.2f}"
        else:
            scaled = f" x {self.scale:g} (cores shared in the cluster)" if self.scale != 1.0 else ""
        if self.prefill_scale != 1.0:
            scaled += f", prefill parts x {self.prefill_scale:g} more"
        return "step times: measured whole engine steps" + scaled + "; " + "; ".join(self.notes)


def engine_step_table_for(
    cfg: ClusterConfig, pool: PoolConfig, calibration_dir: Path | None = None
) -> EngineStepTable | None:
    """The measured whole-engine table of a CPU pool (its profile's, measured for the same
    architecture), else None (a GPU pool, or nothing measured: the layer model then)."""
    if cfg.node.accelerator != "cpu":
        return None
    directory = CALIBRATION_DIR if calibration_dir is None else calibration_dir
    path = directory / engine_table_name(cfg.profile)
    if not path.exists():
        return None
    try:
        sim = cfg.simulator
        return EngineStepTable.load(
            path,
            cfg.model.architecture,
            sim.engine_step_scale,
            sim.engine_step_scale_spread,
            sim.engine_step_scale_autocorr,
            sim.engine_prefill_scale,
        )
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("engine step table %s unusable for pool %r (%s): layer model instead", path, pool.name, exc)
        return None
