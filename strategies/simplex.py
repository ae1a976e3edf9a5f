"""Weight updates on the probability simplex: projections and the entropic step.

The simplex is ``Δ_m = {λ ∈ R^m : λ_i >= 0, Σ_i λ_i = 1}``. Online mirror descent on Δ_m
takes the entropic step (negative-entropy mirror map) or the Euclidean step (a gradient step
followed by ``project_to_simplex``). FedMGDA+ solves its min-norm problem over the part of
Δ_m that lies in a box around the uniform weights (``project_to_capped_simplex``).
"""

from __future__ import annotations

import numpy as np

def _as_vector(values: np.ndarray | list[float], name: str) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"Invalid {name}: expected a non-empty 1-D array, got shape {vector.shape}.")
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"Invalid {name}: every value must be finite, got {vector.tolist()}.")
    return vector


def project_to_simplex(values: np.ndarray | list[float]) -> np.ndarray:
    """Return the Euclidean projection ``argmin_{x ∈ Δ_m} ||x - v||²`` of ``values``.

    Sort-based algorithm (Held, Wolfe and Crowder, 1974; Duchi et al., ICML 2008,
    "Efficient Projections onto the l1-Ball for Learning in High Dimensions"): with
    ``u = sort(v)`` in decreasing order, ``ρ = max{j : u_j + (1 - Σ_{r<=j} u_r) / j > 0}``,
    ``τ = (Σ_{r<=ρ} u_r - 1) / ρ`` and ``x = max(v - τ, 0)``. Cost O(m log m).

    The projection is unchanged by adding a constant to every value, so ``max(v)`` is
    subtracted first. Then ``u_1 = 0`` and the index ``j = 1`` satisfies the condition in
    floating point too, so ρ exists even for values near 1e16, where ``u_1 - 1`` would round
    back to ``u_1``.
    """
    vector = _as_vector(values, "values")
    vector = vector - vector.max()
    descending = np.sort(vector)[::-1]
    cumulative = np.cumsum(descending)
    ranks = np.arange(1, vector.size + 1)

    satisfied = descending - (cumulative - 1.0) / ranks > 0
    rho = int(ranks[satisfied][-1])
    tau = (cumulative[rho - 1] - 1.0) / rho
    return np.maximum(vector - tau, 0.0)


def entropic_step(weights: np.ndarray | list[float], gradient: np.ndarray | list[float], step_size: float) -> np.ndarray:
    """Return the exponentiated-gradient ascent step ``λ'_i = λ_i exp(η g_i) / Σ_j λ_j exp(η g_j)``.

    This is mirror ascent on Δ_m with the negative-entropy mirror map (Kivinen and Warmuth,
    1997), the weight update of OMD-TCH (Liu et al., 2024, arXiv 2410.21764). It is computed
    in log space with the maximum exponent subtracted, so large ``η g`` cannot overflow.
    A weight of zero stays zero.
    """
    lambda_ = _as_vector(weights, "weights")
    gradient = _as_vector(gradient, "gradient")
    if lambda_.shape != gradient.shape:
        raise ValueError(f"weights have shape {lambda_.shape} but the gradient has shape {gradient.shape}.")
    if np.any(lambda_ < 0) or lambda_.sum() <= 0:
        raise ValueError(f"Invalid weights {lambda_.tolist()}: they must be non-negative with a positive sum.")

    with np.errstate(divide="ignore"):
        exponents = np.log(lambda_) + step_size * gradient
    exponents -= exponents.max()
    unnormalized = np.exp(exponents)
    return unnormalized / unnormalized.sum()


def euclidean_step(weights: np.ndarray | list[float], gradient: np.ndarray | list[float], step_size: float) -> np.ndarray:
    """Return the projected gradient ascent step ``Π_Δ(λ + η g)``."""
    lambda_ = _as_vector(weights, "weights")
    gradient = _as_vector(gradient, "gradient")
    if lambda_.shape != gradient.shape:
        raise ValueError(f"weights have shape {lambda_.shape} but the gradient has shape {gradient.shape}.")
    return project_to_simplex(lambda_ + step_size * gradient)


def project_to_capped_simplex(values: np.ndarray | list[float], lower: float, upper: float) -> np.ndarray:
    """Return ``argmin ||x - v||²`` over ``{x : Σ x_i = 1, lower <= x_i <= upper}``.

    The solution is ``x_i = clip(v_i - τ, lower, upper)`` for the shift τ at which the sum
    is 1. The sum ``s(τ)`` is non-increasing and linear between the 2m breakpoints
    ``v_i - upper`` and ``v_i - lower``. It is evaluated at every breakpoint from prefix
    sums of the sorted values, and τ is interpolated exactly on the segment where s crosses
    1. Cost O(m log m).
    """
    vector = _as_vector(values, "values")
    size = vector.size
    if not lower <= upper or size * lower > 1.0 + 1e-12 or size * upper < 1.0 - 1e-12:
        raise ValueError(
            f"The box [{lower}, {upper}] contains no point of the simplex in {size} dimensions; "
            f"it needs lower <= 1/{size} <= upper."
        )
    if upper - lower <= 1e-15:
        return np.full(size, 1.0 / size)

    ascending = np.sort(vector)
    prefix = np.concatenate(([0.0], np.cumsum(ascending)))
    total = prefix[-1]

    def clipped_sum(shifts: np.ndarray) -> np.ndarray:
        num_upper = size - np.searchsorted(ascending, shifts + upper, side="left")
        num_lower = np.searchsorted(ascending, shifts + lower, side="right")
        sum_upper = total - prefix[size - num_upper]
        sum_lower = prefix[num_lower]
        num_free = size - num_upper - num_lower
        return upper * num_upper + lower * num_lower + (total - sum_upper - sum_lower) - shifts * num_free

    breakpoints = np.sort(np.concatenate((vector - upper, vector - lower)))
    sums = clipped_sum(breakpoints)
    crossing = int(np.searchsorted(-sums, -1.0, side="left"))
    if crossing == 0:
        shift = breakpoints[0]
    elif crossing == breakpoints.size:
        shift = breakpoints[-1]
    else:
        left, right = breakpoints[crossing - 1], breakpoints[crossing]
        drop = sums[crossing - 1] - sums[crossing]
        shift = right if drop <= 0 else left + (sums[crossing - 1] - 1.0) * (right - left) / drop
    return np.clip(vector - shift, lower, upper)
