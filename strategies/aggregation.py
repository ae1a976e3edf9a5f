"""Arithmetic on models held as ArrayRecords: conversion to numpy and weighted averages.

Strategies that weight clients by something other than their example counts (the Tchebycheff
family, FedMGDA+, q-FFL) combine client models here. Floating-point arrays are combined in
float64 and cast back to their own dtype. Integer arrays, such as BatchNorm's
``num_batches_tracked``, are combined the same way and rounded to the nearest integer, so a
model keeps its dtypes from round to round and passes reply validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message

ModelArrays = dict[str, np.ndarray]


def record_to_numpy(record: ArrayRecord) -> ModelArrays:
    """Return the arrays of ``record`` as new numpy arrays, keyed as in the record."""
    return {key: array.numpy() for key, array in record.items()}


def reply_arrays(message: Message) -> ModelArrays:
    """Return the model a training reply carries (its single ArrayRecord) as numpy arrays."""
    return record_to_numpy(next(iter(message.content.array_records.values())))


def numpy_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Return an ArrayRecord holding ``arrays`` in their order."""
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in arrays.items()})


def cast_like(values: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> ModelArrays:
    """Cast each array to the dtype of the array with its key in ``reference``, rounding for integers."""
    cast: ModelArrays = {}
    for key, template in reference.items():
        value = values[key]
        if np.issubdtype(template.dtype, np.integer) or np.issubdtype(template.dtype, np.bool_):
            value = np.rint(value)
        cast[key] = np.asarray(value, dtype=template.dtype)
    return cast


def weighted_average(models: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | np.ndarray) -> ModelArrays:
    """Return ``Σ_k c_k θ_k`` with ``c = weights / Σ weights``, in the dtypes of the first model.

    Raises ValueError when the weights are negative, not finite, sum to zero, or are not one
    per model.
    """
    coefficients = np.asarray(weights, dtype=np.float64)
    if coefficients.shape != (len(models),):
        raise ValueError(f"Expected one weight per model ({len(models)}), got shape {coefficients.shape}.")
    if not np.all(np.isfinite(coefficients)) or np.any(coefficients < 0) or coefficients.sum() <= 0:
        raise ValueError(f"Invalid aggregation weights {coefficients.tolist()}: they must be finite, non-negative and not all zero.")
    coefficients = coefficients / coefficients.sum()

    totals: dict[str, np.ndarray] = {}
    for model, coefficient in zip(models, coefficients):
        if coefficient == 0.0:
            continue
        for key, value in model.items():
            contribution = coefficient * np.asarray(value, dtype=np.float64)
            if key in totals:
                totals[key] += contribution
            else:
                totals[key] = contribution
    return cast_like(totals, models[0])


def floating_keys(model: Mapping[str, np.ndarray]) -> list[str]:
    """Return the keys of the floating-point arrays of ``model``, the ones a gradient step moves."""
    return [key for key, value in model.items() if np.issubdtype(value.dtype, np.floating)]


def flatten(model: Mapping[str, np.ndarray], keys: Sequence[str], dtype: np.dtype | type = np.float64) -> np.ndarray:
    """Concatenate the arrays named by ``keys`` into one vector of ``dtype``."""
    if not keys:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(model[key], dtype=dtype).ravel() for key in keys])


def unflatten(vector: np.ndarray, reference: Mapping[str, np.ndarray], keys: Sequence[str]) -> ModelArrays:
    """Split ``vector`` back into arrays shaped like ``reference[key]`` for each key (inverse of ``flatten``)."""
    arrays: ModelArrays = {}
    offset = 0
    for key in keys:
        shape = reference[key].shape
        size = int(np.prod(shape, dtype=np.int64))
        arrays[key] = vector[offset : offset + size].reshape(shape)
        offset += size
    if offset != vector.size:
        raise ValueError(f"Vector has {vector.size} values but the arrays {list(keys)} contain {offset}.")
    return arrays


def combine_float_update(
    updated_floats: Mapping[str, np.ndarray],
    models: Sequence[Mapping[str, np.ndarray]],
    example_counts: Sequence[int],
    reference: Mapping[str, np.ndarray],
) -> ModelArrays:
    """Return a model whose floating-point arrays come from ``updated_floats`` and whose other arrays are averaged.

    Strategies that take a step on the floating-point arrays (q-FFL, FedMGDA+) have no rule
    for integer buffers such as BatchNorm's ``num_batches_tracked``. Those get the
    example-weighted average of the client values, rounded. Keys keep the order of
    ``reference`` and every array its dtype.
    """
    others = [key for key in reference if key not in updated_floats]
    averaged = weighted_average([{key: model[key] for key in others} for model in models], example_counts) if others else {}
    combined = {key: updated_floats[key] if key in updated_floats else averaged[key] for key in reference}
    return cast_like(combined, reference)
