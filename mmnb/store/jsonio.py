"""JSON in and out of a store: strict on input, standard on output.

Input is untrusted: duplicate keys and the non-standard constants NaN/Infinity are refused
(Python's json accepts both silently), and nesting is bounded. Output is standard JSON: a
non-finite float becomes null where it is a measurement (a loss of a skipped step), and is an
error where it would be state.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def loads(text: str) -> Any:
    """Parse untrusted JSON; raises ValueError (duplicate key, NaN, too deep, malformed)."""
    if not isinstance(text, str):
        raise ValueError(f"expected JSON text, got {type(text).__name__}")
    value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    _check_depth(value, 0)
    return value


def _check_depth(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, depth + 1)


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Standard JSON: non-finite floats written as null."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def dumps_state(value: Any) -> str:
    """JSON of state: a non-finite float is an error (ValueError), never written."""
    return json.dumps(value, allow_nan=False)
