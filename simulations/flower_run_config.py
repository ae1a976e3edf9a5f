"""Format a run config as ``flwr run --run-config`` arguments that Flower reads back unchanged.

Both ways of submitting a run through ``flwr run`` use this module: the Ray
simulation engine (``simulations.ray_engine``) and the deployment launcher
(``server.launch``).

Flower 1.42 parses each ``--run-config`` argument by splitting it at spaces
outside quotes and reading every ``key=value`` pair's value as TOML. Its
splitting regular expression ends a double-quoted value at the first ``"``,
escaped or not, so a ``"`` inside a string is written as the TOML escape
``\\u0022``. Control characters are escaped the same way, so every str value
round-trips, whatever quotes, spaces or line breaks it holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_TOML_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_TOML_STRING_ESCAPES = {"\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def format_toml_value(value: Any) -> str:
    """Format one run-config value as a TOML scalar.

    Strings become basic strings with ``"`` and control characters written as
    ``\\uXXXX``. Floats keep their float type (``0.1``, ``1.0``, ``1e-05``,
    ``inf``, ``nan``). Raises ``TypeError`` for anything but bool, int, float
    and str.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_escape_toml_character(character) for character in value) + '"'
    raise TypeError(
        f"Invalid run-config value {value!r} ({type(value).__name__}): "
        "Flower run configs hold only bool, int, float and str values."
    )


def format_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """Return one ``key=value`` argument per run-config entry, each to follow its own ``--run-config``.

    Raises ``ValueError`` for a key that is not a TOML bare key and
    ``TypeError`` (naming the key) for a value that is not a TOML scalar.
    """
    arguments = []
    for key, value in run_config.items():
        if not isinstance(key, str) or not _TOML_KEY.fullmatch(key):
            raise ValueError(
                f"Invalid run-config key {key!r}: use letters, digits, '-' and '_', for example num-server-rounds."
            )
        try:
            arguments.append(f"{key}={format_toml_value(value)}")
        except TypeError as error:
            raise TypeError(f"Invalid value for run-config key {key!r}: {error}") from None
    return arguments


def run_config_options(run_config: Mapping[str, Any]) -> list[str]:
    """Return ``["--run-config", "k1=v1", "--run-config", "k2=v2", ...]`` for a ``flwr run`` command line."""
    options = []
    for argument in format_run_config(run_config):
        options += ["--run-config", argument]
    return options


def _escape_toml_character(character: str) -> str:
    if character in _TOML_STRING_ESCAPES:
        return _TOML_STRING_ESCAPES[character]
    if character == '"' or ord(character) < 0x20 or ord(character) == 0x7F:
        return f"\\u{ord(character):04x}"
    return character
