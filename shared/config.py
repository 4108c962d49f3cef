"""Strict configuration files: a TOML file checked against its schema, every mistake named.

The controller and the agent read their config files through `load`. A file's schema is a
tree of `Section` models (pydantic v2; `docs/decisions.md` says why), and a section refuses:

- a key it does not know, naming the nearest known key, in its own section or another one
  (`unknown key 'regoin': did you mean 'region'?`, `... did you mean 'require_freeze' in
  [consistency]?`): a misspelt key is never silently the default;
- a value of the wrong type, naming the type expected and what was given: no string is read as
  a number or a number as a string, a boolean is not an integer; a whole number is accepted
  where a number of seconds is meant; NaN and infinity are refused;
- a missing required key, and a value out of its range or without meaning (a section's own
  checks raise ValueError with a sentence, e.g. through `checked` or the address types below).

Every problem in the file is reported at once, each with its key and section, in one
`ConfigInvalid` (exit code 2). A section turns itself into the process's own config (frozen
dataclasses, paths made absolute against the file's directory) once it is valid; the schema
says what the file may hold, the dataclass what the code uses.
"""

from __future__ import annotations

import datetime
import difflib
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from shared.address import parse_address, parse_host
from shared.errors import ConfigInvalid, InvalidArgument

# How alike a word and a known one must be to suggest it (difflib's ratio; its own default).
CLOSE_ENOUGH = 0.6
T = TypeVar("T")
S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """A table of a config file: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def load(path: Path, schema: type[S], what: str) -> S:
    """The file at `path` (`what`: e.g. "agent config") checked against `schema`."""
    source = f"{what} {path}"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigInvalid(
            source=source, problems=[f"cannot read it: {exc.strerror or exc}"]
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigInvalid(source=source, problems=[f"it is not UTF-8 text: {exc}"]) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigInvalid(source=source, problems=[f"it is not valid TOML: {exc}"]) from exc
    return validate(schema, raw, source)


def validate(schema: type[S], raw: Mapping[str, Any], source: str, at: tuple[str, ...] = ()) -> S:
    """`raw` (a parsed table, found at `at` in its file) checked against `schema`."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        problems = [describe(schema, error, at) for error in exc.errors(include_url=False)]
        raise ConfigInvalid(source=source, problems=problems) from None


# --- value types shared by the configs -------------------------------------------------------


def checked(check: Callable[[T], T]) -> AfterValidator:
    """A domain check that raises InvalidArgument (e.g. `validate_vm_id`) as a validator:
    its message becomes a problem naming the key."""

    def run(value: T) -> T:
        try:
            return check(value)
        except InvalidArgument as exc:
            raise ValueError(exc.fields.get("detail", exc.message)) from None

    return AfterValidator(run)


def nearest(word: str, known: Iterable[str]) -> str | None:
    """The known word `word` most likely misspells, if one is close enough."""
    matches = difflib.get_close_matches(word, list(known), n=1, cutoff=CLOSE_ENOUGH)
    return matches[0] if matches else None


def one_of(known: Iterable[str], what: str) -> AfterValidator:
    """A validator for a name that must be one of `known` (`what`: e.g. "snapshot provider"),
    suggesting the nearest when it is not."""
    names = tuple(known)

    def run(value: str) -> str:
        if value not in names:
            near = nearest(value, names)
            hint = f"did you mean {near!r}? " if near is not None else ""
            raise ValueError(f"unknown {what} {value!r}: {hint}known: {', '.join(names)}")
        return value

    return AfterValidator(run)


def _host_port(text: str) -> str:
    parse_address(text)
    return text


def _listen_address(text: str) -> str:
    parse_address(text, allow_port_zero=True)
    return text


# `host:port` to dial (port 1-65535), kept as written.
HostPort = Annotated[str, AfterValidator(_host_port)]
# `host:port` to listen on; port 0 takes any free port.
ListenAddress = Annotated[str, AfterValidator(_listen_address)]
# A host name or IP address (IPv6 brackets taken off).
Host = Annotated[str, AfterValidator(parse_host)]
Port = Annotated[int, Field(ge=1, le=65535)]
NonEmpty = Annotated[str, Field(min_length=1)]
Seconds = Annotated[float, Field(gt=0)]


# --- problems, in words ----------------------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "model_type": "a table",
    "dict_type": "a table",
}
_BOUNDS = {
    "greater_than": ("more than", "gt"),
    "greater_than_equal": ("at least", "ge"),
    "less_than": ("less than", "lt"),
    "less_than_equal": ("at most", "le"),
}


@dataclass(frozen=True)
class _Place:
    """Where in the file a problem is: the section, the key in it, an item of its list."""

    sections: tuple[tuple[str, int | None], ...]  # names, with the index in an array of tables
    model: type[Section]  # the section's schema
    key: str | None = None
    item: int | None = None

    @staticmethod
    def of(schema: type[Section], loc: tuple[int | str, ...], at: tuple[str, ...]) -> _Place:
        found: list[tuple[str, int | None]] = [(name, None) for name in at]
        model, key, item = schema, None, None
        parts = list(loc)
        while parts:
            part = parts.pop(0)
            if isinstance(part, int):
                item = part
                continue
            field = model.model_fields.get(part)
            inner = _section_of(field.annotation) if field is not None else None
            if inner is not None and parts:
                sub, is_array = inner
                index = parts[0] if is_array and isinstance(parts[0], int) else None
                if index is not None:
                    parts.pop(0)
                found.append((part, index))
                model = sub
                continue
            key = part
        return _Place(tuple(found), model, key, item)

    @property
    def section(self) -> str:
        return _show_section(self.sections)

    @property
    def within(self) -> str:
        return f" in {self.section}" if self.sections else ""

    @property
    def is_section(self) -> bool:
        """Whether the problem is with a whole section (e.g. a check of two of its keys)."""
        if self.key is None:
            return True
        field = self.model.model_fields.get(self.key)
        return field is not None and _section_of(field.annotation) is not None

    def __str__(self) -> str:
        if self.key is None:
            return self.section or "the file"
        where = f"{self.key!r}{self.within}"
        return where if self.item is None else f"item {self.item + 1} of {where}"


def describe(schema: type[Section], error: ErrorDetails, at: tuple[str, ...] = ()) -> str:
    """One validation error of `schema` as a sentence naming the key and its section."""
    place = _Place.of(schema, tuple(error["loc"]), at)
    kind = error["type"]
    given = error["input"]
    ctx = error.get("ctx", {})
    if kind == "extra_forbidden":
        assert place.key is not None
        return f"unknown key {place.key!r}{place.within}: {_suggest(schema, at, place)}"
    if kind == "missing":
        return f"missing required key {place.key!r}{place.within}"
    if kind == "finite_number":
        return f"{place} must be a finite number, not {_show(given)}"
    if kind in _EXPECTED:
        return f"{place} must be {_EXPECTED[kind]}, not {_kind_of(given)} ({_show(given)})"
    if kind in _BOUNDS:
        words, bound = _BOUNDS[kind]
        return f"{place} must be {words} {_show(ctx[bound])}, not {_show(given)}"
    if kind in ("string_too_short", "too_short"):
        return f"{place} must not be empty"
    if kind == "value_error":
        if not place.is_section:
            return f"{place}: {ctx['error']}"
        whole = place.sections if place.key is None else (*place.sections, (place.key, None))
        return f"{_show_section(whole)}: {ctx['error']}" if whole else str(ctx["error"])
    return f"{place}: {error['msg']} (given {_show(given)})"


def _suggest(schema: type[Section], at: tuple[str, ...], place: _Place) -> str:
    """The nearest known key: in the key's own section first, then in any other."""
    assert place.key is not None
    here = list(place.model.model_fields)
    if (near := nearest(place.key, here)) is not None:
        return f"did you mean {near!r}?"
    own = tuple(name for name, _ in place.sections)
    elsewhere = [
        (difflib.SequenceMatcher(None, place.key, name).ratio(), name, path, is_array)
        for path, is_array, model in sections(schema, at)
        if path != own
        for name in model.model_fields
    ]
    score, name, path, is_array = max(elsewhere, default=(0.0, "", (), False))
    if score >= CLOSE_ENOUGH:
        where = _show_section(tuple((p, None) for p in path), array=is_array) or "the top level"
        return f"did you mean {name!r} in {where}?"
    return f"known keys {place.within.strip() or 'at the top level'}: {', '.join(here)}"


def sections(
    model: type[Section], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], bool, type[Section]]]:
    """Every section of a schema: its path, whether it is an array of tables, its model."""
    yield path, False, model
    for name, field in model.model_fields.items():
        inner = _section_of(field.annotation)
        if inner is not None:
            sub, is_array = inner
            for sub_path, sub_array, sub_model in sections(sub, (*path, name)):
                yield sub_path, sub_array or (is_array and sub_path == (*path, name)), sub_model


def _section_of(annotation: Any) -> tuple[type[Section], bool] | None:
    """The section type a field holds, and whether as an array of tables; None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation, False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and args:
        inner = _section_of(args[0])
        return (inner[0], True) if inner is not None else None
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if (inner := _section_of(arg)) is not None:
                return inner
    return None


def _show_section(path: tuple[tuple[str, int | None], ...], array: bool = False) -> str:
    """`[a.b]`, `[[disks]]`, or `[[disks]] #2` for the second of them."""
    if not path:
        return ""
    dotted = ".".join(name for name, _ in path)
    index = path[-1][1]
    if index is not None:
        return f"[[{dotted}]] #{index + 1}"
    return f"[[{dotted}]]" if array else f"[{dotted}]"


def _kind_of(value: object) -> str:
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),  # before int: a bool is an int to Python
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a table"),
        ((datetime.date, datetime.time), "a date or time"),
    ]
    return next((word for kind, word in kinds if isinstance(value, kind)), type(value).__name__)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
