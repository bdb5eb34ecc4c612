"""Cost tables measured on the target, and the model of them used between measurements.

For each prunable group g and each width k on a grid, the model with only g at k (every other
group at full width) is measured. Per measured kernel j (the firmware's per-kernel instruction
counts), r[g][j](k) = count_j(g at k) / count_j(full) is the factor that g's width puts on j's
cost. A conv between groups A and B costs ~ cin * cout, so its count is predicted as the
*product* of the two factors: count_j(K) = count_j(full) * prod_g r[g][j](K[g]), exact for a
bilinear kernel, and linear interpolation in k between grid points. Memory (flash, SRAM) is
predicted additively: full + sum_g (mem(g at k) - mem(full)).

Word lengths are a second axis: each weight layer L is measured alone at each word length b
the target offers (every group at full width). Its per-kernel factor multiplies like a width's
(a sub-byte kernel's cost differs by a factor, whatever its width); its memory difference is
scaled by the fraction of L's weights the widths keep (`keep`): with Δw measured at 8 bits and
Δb at full width, base + Δw + Δb·keep is exact for the weight bytes of a pruned low-bit layer.

Intra-kernel patterns are a third axis, handled like word lengths: each conv L is measured alone
with only every s-th window tap kept (prune/patterns.py; the kernels skip the other taps), and its
per-kernel factor multiplies, its memory difference is scaled by `keep`.

Predictions are always anchored to the last *measured* configuration (see `Predictor.anchored`):
the model only has to get the difference right, and every accepted step is measured again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..prune.allocate import nearest_multiple

INSTRUCTION_METRICS = ("latency_ms", "energy_uj")   # both proportional to instructions
MEMORY_METRICS = ("flash_kb", "sram_kb")


def grid_widths(units: int, fractions: tuple[float, ...], min_keep: float,
                multiple: int = 1) -> list[int]:
    """Widths measured for a group of `units` channels: full, the fractions, and the minimum
    (each a multiple of `multiple`, but the full width)."""
    lo = min_width(units, min_keep, multiple)
    ks = {units, lo} | {min(units, max(lo, nearest_multiple(f * units, multiple)))
                        for f in fractions}
    return sorted(ks)


def min_width(units: int, min_keep: float, multiple: int = 1) -> int:
    """The fewest units a group keeps: `min_keep` of them, rounded up to a multiple."""
    return min(units, -(-max(1, math.ceil(min_keep * units)) // multiple) * multiple)


@dataclass
class Predictor:
    """The cost model built from the base and the one-group-at-a-time measurements."""
    base: dict                                  # measured costs at full width
    tables: dict[str, dict[int, dict]]          # group -> width -> measured costs
    full: dict[str, int]                        # group -> full width
    bit_tables: dict[str, dict[int, dict]] = field(default_factory=dict)  # layer -> bits -> costs
    members: dict[str, list[str]] = field(default_factory=dict)  # layer -> groups of its in/out
    tap_tables: dict[str, dict[int, dict]] = field(default_factory=dict)  # layer -> stride -> costs

    @property
    def per_kernel(self) -> bool:
        """Kernels can be matched one to one only if every measurement has the same kernel list."""
        n = len(self.base["kernels"])
        return n > 0 and all(len(c["kernels"]) == n
                             for t in list(self.tables.values()) + list(self.bit_tables.values())
                             + list(self.tap_tables.values())
                             for c in t.values())

    def _kernels(self, costs: dict) -> np.ndarray:
        if self.per_kernel:
            return np.asarray(costs["kernels"], dtype=np.float64)
        return np.asarray([costs["instructions"]], dtype=np.float64)

    def _interp(self, g: str, k: int, value) -> np.ndarray | float:
        """`value(costs)` of group g's table, linearly interpolated at width k."""
        widths = sorted(self.tables[g])
        if k <= widths[0]:
            return value(self.tables[g][widths[0]])
        for lo, hi in zip(widths, widths[1:]):
            if k <= hi:
                t = (k - lo) / (hi - lo)
                return (1 - t) * value(self.tables[g][lo]) + t * value(self.tables[g][hi])
        return value(self.tables[g][widths[-1]])

    def keep(self, layer: str, widths: dict[str, int]) -> float:
        """Fraction of `layer`'s weights left at `widths` (its output and input groups)."""
        f = 1.0
        for g in self.members.get(layer, []):
            f *= widths[g] / self.full[g]
        return f

    def _layer_settings(self, bits, taps):
        """(layer, measured costs) of each word length and tap pattern off the default."""
        out = [(layer, self.bit_tables[layer][b]) for layer, b in (bits or {}).items() if b != 8]
        return out + [(layer, self.tap_tables[layer][s]) for layer, s in (taps or {}).items()
                      if s != 1]

    def instructions(self, widths: dict[str, int], bits: dict[str, int] | None = None,
                     taps: dict[str, int] | None = None) -> float:
        base = self._kernels(self.base)
        total = base.copy()
        for g, k in widths.items():
            if k != self.full[g]:
                factor = self._interp(g, k, self._kernels) / np.maximum(base, 1.0)
                total *= factor
        for _, costs in self._layer_settings(bits, taps):
            total *= self._kernels(costs) / np.maximum(base, 1.0)
        return float(total.sum())

    def memory(self, widths: dict[str, int], metric: str,
               bits: dict[str, int] | None = None, taps: dict[str, int] | None = None) -> float:
        m = self.base[metric] + sum(self._interp(g, k, lambda c: c[metric]) - self.base[metric]
                                    for g, k in widths.items() if k != self.full[g])
        return m + sum((costs[metric] - self.base[metric]) * self.keep(layer, widths)
                       for layer, costs in self._layer_settings(bits, taps))

    def predict(self, widths: dict[str, int], bits: dict[str, int] | None = None,
                taps: dict[str, int] | None = None) -> dict[str, float]:
        """Absolute predicted costs (the model alone; use `anchored` near a measured point)."""
        i = self.instructions(widths, bits, taps)
        ratio = i / max(1.0, self.base["instructions"])
        out = {m: self.base[m] * ratio for m in INSTRUCTION_METRICS}
        out.update({m: self.memory(widths, m, bits, taps) for m in MEMORY_METRICS})
        out["instructions"] = i
        return out

    def anchored(self, measured: dict, measured_widths: dict[str, int],
                 widths: dict[str, int], measured_bits: dict[str, int] | None = None,
                 bits: dict[str, int] | None = None, measured_taps: dict[str, int] | None = None,
                 taps: dict[str, int] | None = None) -> dict[str, float]:
        """Costs of (`widths`, `bits`, `taps`) predicted from a measured neighbour: the model
        supplies the change (a ratio for instruction-driven metrics, a difference for memory)."""
        p_new = self.predict(widths, bits if bits is not None else measured_bits,
                             taps if taps is not None else measured_taps)
        p_old = self.predict(measured_widths, measured_bits, measured_taps)
        ratio = p_new["instructions"] / max(1.0, p_old["instructions"])
        out = {m: measured[m] * ratio for m in INSTRUCTION_METRICS}
        out.update({m: measured[m] + p_new[m] - p_old[m] for m in MEMORY_METRICS})
        out["instructions"] = measured["instructions"] * ratio
        return out
