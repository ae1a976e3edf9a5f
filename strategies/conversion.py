"""Online-to-batch conversions: turn the iterates θ_1..θ_T of an online method into one model.

OMD-TCH (Liu, Zhang, Xie, Donahue and Zhao, "Adaptive Online Mirror Descent for Tchebycheff
Scalarization in Multi-Objective Learning", arXiv 2410.21764, first version 2024) guarantees
its rate for an average of its iterates, not for the last one. ``UniformAverage`` is the plain conversion
``θ̄_T = (1/T) Σ_t θ_t``. ``AdaptiveAverage`` is the adaptive conversion of AdaOMD-TCH from
the same paper: it keeps only iterates whose client-loss vectors do not dominate one another,
so iterates that are worse for every client stop counting.

Both are dataclasses of plain values (numbers, lists, dicts of numpy arrays), so a strategy
keeps them in its checkpointable state. Each stores real copies of the iterates: changing a
model after ``add`` does not change what was stored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from strategies.aggregation import ModelArrays, cast_like

logger = logging.getLogger(__name__)


def _copy_model(arrays: Mapping[str, object]) -> ModelArrays:
    return {key: np.array(value, copy=True) for key, value in arrays.items()}


def dominates(first: Sequence[float], second: Sequence[float]) -> bool:
    """Return True when ``first`` is no worse than ``second`` for every client (``first_i <= second_i``).

    Equal loss vectors dominate each other under this weak definition, so the adaptive
    conversion never keeps two iterates with the same loss vector.
    """
    return bool(np.all(np.asarray(first, dtype=np.float64) <= np.asarray(second, dtype=np.float64)))


@dataclass
class UniformAverage:
    """Plain online-to-batch conversion ``θ̄_T = (1/T) Σ_{t=1}^T θ_t``.

    ``totals`` is the running float64 sum of the iterates and ``template`` a copy of the
    first iterate, whose dtypes the output takes.
    """

    count: int = 0
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    template: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, arrays: Mapping[str, object], losses: Sequence[float] | None = None) -> None:
        """Add the iterate ``arrays``; ``losses`` is accepted for symmetry with ``AdaptiveAverage`` and ignored."""
        model = _copy_model(arrays)
        if not self.totals:
            self.template = {key: value.copy() for key, value in model.items()}
            self.totals = {key: value.astype(np.float64) for key, value in model.items()}
        else:
            for key, value in model.items():
                self.totals[key] += value
        self.count += 1

    def average(self) -> ModelArrays | None:
        """Return the average of the iterates added so far, or None before the first."""
        if self.count == 0:
            return None
        return cast_like({key: total / self.count for key, total in self.totals.items()}, self.template)


@dataclass
class AdaptiveAverage:
    """Adaptive online-to-batch conversion of AdaOMD-TCH (Liu et al., 2024, arXiv 2410.21764).

    Each iterate θ_t comes with its loss vector ``f(θ_t) = (f_1(θ_t), ..., f_m(θ_t))``. The
    conversion keeps a set of iterates whose loss vectors do not dominate one another, each
    with a weight:

    - a new iterate dominated by kept ones is not kept, and its unit weight is split equally
      among the kept iterates that dominate it;
    - otherwise it is kept with weight 1 plus the weights of the kept iterates it dominates,
      which are dropped.

    The weights always sum to the number of iterates T, and the output is
    ``Σ_j weight_j θ_j / T``. ``iterates`` contains copies of the kept models.
    """

    count: int = 0
    losses: list[list[float]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    iterates: list[dict[str, np.ndarray]] = field(default_factory=list)

    def add(self, arrays: Mapping[str, object], losses: Sequence[float]) -> str:
        """Add iterate ``arrays`` with loss vector ``losses``; return "dominated" or "kept"."""
        new_losses = [float(value) for value in losses]
        if not np.all(np.isfinite(new_losses)):
            raise ValueError(f"Invalid loss vector {new_losses}: the adaptive conversion needs finite losses.")
        if self.losses and len(new_losses) != len(self.losses[0]):
            raise ValueError(f"Loss vector has {len(new_losses)} entries, but the kept iterates have {len(self.losses[0])}.")
        self.count += 1

        dominating = [index for index, kept in enumerate(self.losses) if dominates(kept, new_losses)]
        if dominating:
            share = 1.0 / len(dominating)
            for index in dominating:
                self.weights[index] += share
            return "dominated"

        dominated = [index for index, kept in enumerate(self.losses) if dominates(new_losses, kept)]
        weight = 1.0 + sum(self.weights[index] for index in dominated)
        for index in reversed(dominated):
            del self.losses[index]
            del self.weights[index]
            del self.iterates[index]
        self.losses.append(new_losses)
        self.weights.append(weight)
        self.iterates.append(_copy_model(arrays))
        return "kept"

    def average(self) -> ModelArrays | None:
        """Return ``Σ_j weight_j θ_j / T`` over the kept iterates, or None before the first iterate."""
        if self.count == 0:
            return None
        totals: dict[str, np.ndarray] = {}
        for weight, model in zip(self.weights, self.iterates):
            for key, value in model.items():
                contribution = (weight / self.count) * value.astype(np.float64)
                if key in totals:
                    totals[key] += contribution
                else:
                    totals[key] = contribution
        return cast_like(totals, self.iterates[0])
