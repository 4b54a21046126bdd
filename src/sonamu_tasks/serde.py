"""Values crossing a checkpoint are JSON. Never pickle: a stored value must be readable by any process.

Accepted: dict (str keys), list, tuple, str, int, float (finite), bool, None, pydantic models and
dataclasses (stored as their JSON form). A value comes back from a checkpoint as the same JSON, and where
the producing function declares a return type, validated into that type (needs pydantic), so the first
execution and every replay see the same value.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from functools import lru_cache
from typing import Any

from .errors import SerializationError


def dumps(value: Any, *, what: str) -> str:
    """Encode `value` as JSON text, or raise SerializationError that names `what` (a step, an input...)."""
    try:
        return json.dumps(value, default=_encode_object, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as error:
        raise SerializationError(f"{what} cannot be stored as JSON: {error}") from error


def loads(text: str | bytes | None) -> Any:
    return None if text is None else json.loads(text)


def decode(value: Any, annotation: Any) -> Any:
    """Turn a JSON value back into `annotation` (a pydantic model, dataclass ...) when one is declared."""
    adapter = _adapter_for(annotation)
    return value if adapter is None else adapter.validate_python(value)


def encode_error(error: BaseException, *, step: str | None = None) -> dict[str, Any]:
    """The stored form of an error: type, message, traceback and the step that raised it."""
    stored: dict[str, Any] = {
        "type": type(error).__qualname__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    if step is not None:
        stored["step"] = step
    return stored


def _encode_object(value: Any) -> Any:
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and not isinstance(value, type):
        return model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    raise TypeError(
        f"a value of type {type(value).__name__} is not JSON "
        "(use dict, list, str, int, float, bool, None, a pydantic model or a dataclass)"
    )


_PLAIN = (dict, list, str, int, float, bool, type(None))


@lru_cache(maxsize=512)
def _adapter_for(annotation: Any) -> Any:
    if annotation in _PLAIN or annotation is Any or annotation is None or isinstance(annotation, str):
        return None
    try:
        from pydantic import TypeAdapter
    except ImportError:  # pragma: no cover - pydantic is optional
        return None
    try:
        return TypeAdapter(annotation)
    except Exception:  # an annotation pydantic cannot build a validator for: hand back plain JSON
        return None
