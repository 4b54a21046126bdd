"""Values crossing a checkpoint are JSON. Never pickle: a stored value must be readable by any process.

Accepted: dict (str keys), list, tuple, str, int, float (finite), bool, None, pydantic models (dumped by
alias, as their validation reads them) and dataclasses (stored as their JSON form). A value comes back
from a checkpoint as the same JSON, and where the producing function declares a return type, validated
into that type (needs pydantic), so the first execution and every replay see the same value.

Refused the same way on both backends, with the JSON path of the culprit: strings (values or keys)
holding NUL (PostgreSQL's jsonb cannot store it) or a lone surrogate (not Unicode text). A pair of
surrogates in a Python str is stored as the one character it encodes.

Read back as PostgreSQL's jsonb gives it, on every backend and on the first execution too (`loads`): an
object's keys shortest first (then by their UTF-8 bytes), a float written with a positive exponent (1e16 and
up) as the integer it is, -0.0 as 0.0. jsonb stores values so, and a step's first execution got the value as
it went in while its replays read it back from jsonb: the order of a dict's keys, a float's type, and any
decision taken on them, changed between the two.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import traceback
import typing
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import lru_cache
from typing import Any

from .errors import SerializationError
from .limits import (
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_ERROR_TRACEBACK_LENGTH,
    MAX_ERROR_TYPE_LENGTH,
    has_unstorable_text,
    shown,
    storable_text,
)


def dumps(value: Any, *, what: str) -> str:
    """Encode `value` as JSON text, or raise SerializationError that names `what` (a step, an input...)."""
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as error:
        # Rare: find where, for the message (the encoder does not say).
        try:
            where = _unencodable(value, "$", set())
        except RecursionError:
            where = None
        raise SerializationError(f"{what} cannot be stored as JSON: {where or error}") from error
    # json.dumps escapes everything outside ASCII, so NUL and surrogates show up only as \u escapes. Most
    # values hold no backslash at all: one memchr (~40 ns for 400 characters) and done.
    if "\\" in text and ("\\u0000" in text or "\\ud" in text):
        _refuse_unstorable_escapes(text, what)
    return text


def loads(text: str | bytes | None) -> Any:
    """JSON text as PostgreSQL's jsonb reads it back (see the module's docstring); None for None."""
    if text is None:
        return None
    return json.loads(text, object_pairs_hook=_as_jsonb_orders, parse_float=_as_jsonb_reads)


def _as_jsonb_orders(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(sorted(pairs, key=_jsonb_key_order))


def _jsonb_key_order(pair: tuple[str, Any]) -> tuple[int, bytes]:
    encoded = pair[0].encode("utf-8", "surrogatepass")
    return len(encoded), encoded


def _as_jsonb_reads(text: str) -> float | int:
    """A JSON number with a fraction or an exponent, as jsonb gives it back: stored as a decimal, it comes
    back without a fraction (an int to Python) when its exponent covers every fractional digit."""
    value = float(text)
    if value == 0:
        return 0.0  # a decimal has no negative zero
    mantissa, _, exponent = text.lower().partition("e")
    if exponent and int(exponent) >= len(mantissa.partition(".")[2]):
        return int(Decimal(text))
    return value


def decode(value: Any, annotation: Any) -> Any:
    """Turn a JSON value back into `annotation` (a pydantic model, dataclass ...) when one is declared."""
    if annotation is float and type(value) is int:
        return float(value)  # a float of 1e16 and up reads back as an int (see `loads`); -> float says float
    adapter = _adapter_for(annotation)
    return value if adapter is None else adapter.validate_python(value)


def decode_output(value: Any, annotation: Any, what: str) -> Any:
    """`decode` for a value read back as a type promised to the caller (a run's output): a value that does not
    fit is a SerializationError naming `what` and the type, not pydantic's own error."""
    try:
        return decode(value, annotation)
    except Exception as error:
        problems = "; ".join(validation_problems(error, "(output)"))
        declared = _type_name(annotation)
        raise SerializationError(f"{what} does not fit its declared type {declared}: {problems}") from error


def declared_return(fn: Callable[..., Any]) -> Any:
    """The return annotation of `fn`, resolved (None when there is none or it cannot be resolved)."""
    # Bound methods are new objects at every access: cache on the function underneath.
    return _declared_return(getattr(fn, "__func__", fn))


@lru_cache(maxsize=1024)
def _declared_return(fn: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable forward references, or not a function: hand back plain JSON
        return None


def validation_problems(error: Exception, whole: str = "(input)") -> list[str]:
    """What a validation error says, one line per field ("order_id: Input should be a valid integer"); a
    problem with the value as a whole is named `whole`."""
    errors = getattr(error, "errors", None)
    if callable(errors):  # pydantic.ValidationError: one line per field
        try:
            problems = []
            for item in errors():
                location = ".".join(str(part) for part in item.get("loc", ())) or whole
                problems.append(f"{location}: {item.get('msg', 'invalid')}")
            if problems:
                return problems
        except Exception:  # not a pydantic error after all; fall through to its message
            pass
    return [f"{type(error).__name__}: {error}"]


def _type_name(annotation: Any) -> str:
    return annotation.__qualname__ if isinstance(annotation, type) else repr(annotation).removeprefix("typing.")


def encode_error(error: BaseException, *, step: str | None = None) -> dict[str, Any]:
    """The stored form of an error: type, message, traceback and the step that raised it.

    Always storable, whatever the error holds: NUL and lone surrogates are replaced by their escapes and
    each part is cut to its limit (`limits.MAX_ERROR_*`) with a marker saying so. An error that cannot
    be recorded would otherwise fail its run's every attempt at the same place, forever."""
    stored: dict[str, Any] = {
        "type": storable_text(type(error).__qualname__, MAX_ERROR_TYPE_LENGTH),
        "message": storable_text(_message(error), MAX_ERROR_MESSAGE_LENGTH),
        "traceback": storable_text(_traceback(error), MAX_ERROR_TRACEBACK_LENGTH, keep_end=True),
    }
    if step is not None:
        stored["step"] = step
    return stored


def _message(error: BaseException) -> str:
    try:
        return str(error)
    except Exception as broken:  # a __str__ that raises must not stop the error from being recorded
        return f"<the error's message could not be read: {type(broken).__name__}>"


def _traceback(error: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(error))
    except Exception as broken:
        return f"<the traceback could not be formatted: {type(broken).__name__}>"


def _encode_object(value: Any) -> Any:
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and not isinstance(value, type):
        # By alias: the stored form is what the model's own validation reads back (a field declared
        # `order_id: int = Field(alias="orderId")` is stored as "orderId").
        return model_dump(mode="json", by_alias=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    raise TypeError(
        f"a value of type {type(value).__name__} is not JSON "
        "(use dict, list, str, int, float, bool, None, a pydantic model or a dataclass)"
    )


# One encoder for every value: json.dumps with options builds a new one at each call (a third of its time for
# a small value).
_ENCODER = json.JSONEncoder(default=_encode_object, allow_nan=False, separators=(",", ":"))


# An escaped backslash first, so `\\u0000` (a backslash, then the text "u0000") is never read as an
# escape; then NUL, a surrogate pair (fine: one character beyond the BMP), or any other surrogate (lone).
_ESCAPES = re.compile(r"\\\\|\\u0000|\\ud[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}|\\ud[89a-f][0-9a-f]{2}")


def _refuse_unstorable_escapes(text: str, what: str) -> None:
    for match in _ESCAPES.finditer(text):
        escape = match.group()
        if escape == "\\u0000" or len(escape) == 6:
            break
    else:
        return
    # Rare: find where, for the message, from the decoded value.
    found = next(_unstorable_strings(json.loads(text), "$"), None)
    where = "a string" if found is None else found
    raise SerializationError(
        f"{what} cannot be stored: {where}, which no backend can store (PostgreSQL's jsonb refuses NUL, "
        "and a lone surrogate is not Unicode text); remove or replace it"
    )


def _unstorable_strings(value: Any, path: str) -> Iterator[str]:
    """Where and what, for every string in `value` holding NUL or a lone surrogate."""
    if isinstance(value, str):
        if has_unstorable_text(value):
            yield f"the string at {path} {_describe(value)}"
    elif isinstance(value, dict):
        for key, item in value.items():
            if has_unstorable_text(key):
                yield f"a key at {path} {_describe(key)}"
            yield from _unstorable_strings(item, f"{path}[{json.dumps(key if len(key) <= 40 else key[:40] + '...')}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _unstorable_strings(item, f"{path}[{index}]")


def _unencodable(value: Any, path: str, enclosing: set[int]) -> str | None:
    """Where and what, for the first part of `value` the encoder refuses, in the encoder's order (None: not
    found, say a model whose dump raised). `enclosing`: the containers around `path`, to tell a cycle."""
    if value is None or isinstance(value, str | int | bool):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} at {path} is not a finite number"
    if isinstance(value, dict | list | tuple):
        if id(value) in enclosing:
            return f"the value at {path} contains itself"
        enclosing.add(id(value))
        try:
            if isinstance(value, dict):
                for key, item in value.items():
                    if key is not None and not isinstance(key, str | int | float | bool):
                        return f"a key of type {type(key).__name__} at {path} (keys are strings)"
                    if found := _unencodable(item, f"{path}[{json.dumps(str(key))}]", enclosing):
                        return found
            else:
                for index, item in enumerate(value):
                    if found := _unencodable(item, f"{path}[{index}]", enclosing):
                        return found
            return None
        finally:
            enclosing.discard(id(value))
    try:
        encoded = _encode_object(value)
    except TypeError as error:
        return f"at {path}, {error}"
    except Exception:
        return None
    return _unencodable(encoded, path, enclosing)


def _describe(text: str) -> str:
    what = "NUL (\\u0000)" if "\x00" in text else "a lone surrogate"
    return f"({shown(text)}) holds {what}"


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
