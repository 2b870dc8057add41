"""The vocabulary in which every message of the protocol is declared.

`trioflow.comm.messages` declares each op once, as a `Message` subclass
whose class attributes are *field kinds*::

    class TaskFinished(Message, op="task_finished", channels=(WORKER_TO_SCHEDULER,)):
        key = KEY
        nbytes = Int(0, MAX_NBYTES)
        value = Optional(Pickled(max_bytes=INLINE_VALUE_BYTES))

From that one declaration come the checks applied to every message that
arrives (`Message.from_wire`), the map that goes on the wire
(`Message.to_wire`), the reference tables of docs/protocol.md (a test
compares them), and the Hypothesis strategies of the fuzzing tests.

Why a small vocabulary of our own rather than a schema library: the checks
run on every message a server receives, and they must say, in words a user
can act on, which field of which op broke which bound ("'restart': field
'timeout' must be between 0 and 86400, got -1.0"). Each kind is a few lines
of plain Python, cheap enough for the hot path (a `task_finished` is checked
in about a microsecond and a half).

Rules:

* A peer is a stranger: every value is checked for its type *and* its
  bounds; a map from a peer never reaches a shell unchecked.
* A field not declared is an error, not ignored: one place knows the
  protocol, so an unknown field means the peer speaks something else.
* Messages built by our own code are not checked again (`Message(...)`
  trusts its caller): the checks guard the edge, not every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from trioflow.comm.serialize import Serialized
from trioflow.errors import ProtocolError

# How much of a peer-supplied string may reach a log line or an error text.
CLIP_CHARS = 120


def clip(value: Any, limit: int = CLIP_CHARS) -> str:
    """`repr(value)`, cut to about `limit` characters for logs and errors.

    Every string a peer supplies (an op name, a key, an address, a reason)
    goes through this before it is logged: a 10 MB op name must cost a log
    line, not 10 MB of log.
    """
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit:
        value = value[: 4 * limit]  # no need to repr megabytes to keep 120 characters
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit}+ more chars)"


class FieldError(Exception):
    """A value broke its declaration; `path` says where, innermost last.

    Kinds raise it without knowing where they are; each enclosing list, map
    and record adds its part of the path on the way out, and `Record.check`
    turns it into one `ProtocolError` naming the op, the field and the bound
    (``'submit': field tasks[3].retries must be an int between 0 and 1000,
    got 9223372036854775807``). Building that text only on failure keeps
    the checks cheap when all is well, which is nearly always.
    """

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []

    def text(self, where: str) -> str:
        path = "".join(reversed(self.path)).lstrip(".")
        return f"{where}: field {path} {self.problem}" if path else f"{where}: {self.problem}"


class Kind:
    """What one field may hold; `check` returns the value or raises `FieldError`."""

    def check(self, value: Any) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        """A short human text for docs/protocol.md, e.g. ``an int between 0 and 1000``."""
        raise NotImplementedError

    def _fail(self, value: Any) -> FieldError:
        return FieldError(f"must be {self.describe()}, got {_kind_of(value)}")


def _kind_of(value: Any) -> str:
    if isinstance(value, (bool, int, float)) or value is None:
        return clip(value, 40)
    if isinstance(value, (str, bytes)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


class Str(Kind):
    """A string of at most `max_chars` characters (optionally checked further)."""

    def __init__(self, max_chars: int, *, min_chars: int = 0, name: str = "str", test: Callable[[str], bool] | None = None):
        self.max_chars = max_chars
        self.min_chars = min_chars
        self.name = name
        self.test = test

    def check(self, value: Any) -> str:
        if type(value) is not str or not self.min_chars <= len(value) <= self.max_chars:
            raise self._fail(value)
        if self.test is not None and not self.test(value):
            raise FieldError(f"is not a valid {self.name}: {clip(value)}")
        return value

    def describe(self) -> str:
        article = "an" if self.name[0] in "aeiou" else "a"
        if self.min_chars == self.max_chars:
            return f"{article} {self.name} of {self.max_chars} chars"
        return f"{article} {self.name} of at most {self.max_chars} chars"


class Int(Kind):
    """An integer in ``lo..hi`` (bools are not integers here)."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def check(self, value: Any) -> int:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise self._fail(value)
        return value

    def describe(self) -> str:
        return f"an int between {self.lo} and {self.hi}"


class Float(Kind):
    """A finite number in ``lo..hi`` (an int is accepted and made a float)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def check(self, value: Any) -> float:
        if type(value) not in (float, int) or not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise self._fail(value)
        return float(value)

    def describe(self) -> str:
        return f"a number between {self.lo:g} and {self.hi:g}"


class Bool(Kind):
    def check(self, value: Any) -> bool:
        if type(value) is not bool:
            raise self._fail(value)
        return value

    def describe(self) -> str:
        return "true or false"


class Choice(Kind):
    """One of a few strings."""

    def __init__(self, *choices: str):
        self.choices = choices

    def check(self, value: Any) -> str:
        if type(value) is not str or value not in self.choices:
            raise FieldError(f"must be {self.describe()}, got {clip(value, 40)}")
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


class Bytes(Kind):
    """Raw bytes (msgpack bin) of at most `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def check(self, value: Any) -> bytes:
        if type(value) is not bytes or len(value) > self.max_bytes:
            raise self._fail(value)
        return value

    def describe(self) -> str:
        return f"bytes, at most {self.max_bytes}"


class Pickled(Kind):
    """A `Serialized` value (pickle stream + buffers, in frames of their own).

    Nothing here unpickles it: whether to unpickle, and from whom, is the
    receiving shell's decision (design.md §6 rule 2).
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes

    def check(self, value: Any) -> Serialized:
        if type(value) is not Serialized:
            raise self._fail(value)
        if self.max_bytes is not None and value.nbytes > self.max_bytes:
            raise FieldError(f"is a pickled value of {value.nbytes} bytes, more than {self.max_bytes}")
        return value

    def describe(self) -> str:
        return "a pickled value" + ("" if self.max_bytes is None else f" of at most {self.max_bytes} bytes")


class Nullable(Kind):
    """`kind`, or nil."""

    def __init__(self, kind: Kind):
        self.kind = kind

    def check(self, value: Any) -> Any:
        return None if value is None else self.kind.check(value)

    def describe(self) -> str:
        return f"{self.kind.describe()} or nil"


class List(Kind):
    """A list of at most `max_items` values of `item`."""

    def __init__(self, item: Kind, max_items: int):
        self.item = item
        self.max_items = max_items

    def check(self, value: Any) -> list:
        if type(value) is not list or len(value) > self.max_items:
            raise self._fail(value)
        item_kind = self.item
        if type(item_kind) is Str and item_kind.test is None:
            # The common case (a list of keys), without a call per item.
            low, high = item_kind.min_chars, item_kind.max_chars
            if all(type(item) is str and low <= len(item) <= high for item in value):
                return value
        check = item_kind.check
        out = []
        for i, item in enumerate(value):
            try:
                out.append(check(item))
            except FieldError as exc:
                exc.path.append(f"[{i}]")
                raise
        return out

    def describe(self) -> str:
        return f"a list of at most {self.max_items} ({self.item.describe()})"


class Map(Kind):
    """A map of at most `max_items` entries, from `key` to `value`."""

    def __init__(self, key: Kind, value: Kind, max_items: int):
        self.key = key
        self.value = value
        self.max_items = max_items

    def check(self, value: Any) -> dict:
        if type(value) is not dict or len(value) > self.max_items:
            raise self._fail(value)
        check_key, check_value = self.key.check, self.value.check
        out = {}
        for k, v in value.items():
            try:
                out[check_key(k)] = check_value(v)
            except FieldError as exc:
                exc.path.append(f"[{clip(k, 40)}]")
                raise
        return out

    def describe(self) -> str:
        return f"a map of at most {self.max_items} ({self.key.describe()} -> {self.value.describe()})"


class Nested(Kind):
    """A `Record` inside a message (a task in a submit, a failure)."""

    def __init__(self, record: type[Record]):
        self.record = record

    def check(self, value: Any) -> Record:
        if type(value) is not dict:
            raise self._fail(value)
        return self.record.check(value)

    def describe(self) -> str:
        return f"a {self.record.__name__} map"


class Tagged(Kind):
    """One of several records, told apart by the string field `tag`."""

    def __init__(self, tag: str, records: Mapping[str, type[Record]]):
        self.tag = tag
        self.records = dict(records)

    def check(self, value: Any) -> Record:
        if type(value) is not dict:
            raise self._fail(value)
        tag = value.get(self.tag)
        record = self.records.get(tag) if type(tag) is str else None
        if record is None:
            error = FieldError(f"must be one of {sorted(self.records)}, got {clip(value.get(self.tag))}")
            error.path.append(f".{self.tag}")
            raise error
        fields = dict(value)
        del fields[self.tag]
        return record.check(fields)

    def describe(self) -> str:
        return f"a map whose {self.tag!r} is one of " + ", ".join(repr(k) for k in self.records)


class Optional:
    """Marks a field that may be absent; it then takes `default`."""

    def __init__(self, kind: Kind, default: Any = None):
        self.kind = kind
        self.default = default


# The default of a field that must be present.
REQUIRED = object()


class Record:
    """A map with declared fields; the base of every message and nested map.

    Subclasses list their fields as class attributes (a `Kind`, or an
    `Optional` around one). `__init_subclass__` moves them into `FIELDS`,
    in declaration order, so instances carry plain attribute values.
    """

    FIELDS: ClassVar[dict[str, tuple[Kind, Any]]] = {}
    # Called after the fields are checked, for rules across fields; raises
    # `FieldError`.
    check_fields: ClassVar[Callable[[Record], None] | None] = None
    # (field, value) that names this record inside a `Tagged` union.
    TAG: ClassVar[tuple[str, str] | None] = None

    def __init_subclass__(cls, tag: tuple[str, str] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if tag is not None:
            cls.TAG = tag
        fields = dict(cls.FIELDS)
        for name, spec in list(vars(cls).items()):
            if isinstance(spec, Kind):
                fields[name] = (spec, REQUIRED)
            elif isinstance(spec, Optional):
                fields[name] = (spec.kind, spec.default)
            else:
                continue
            delattr(cls, name)
        cls.FIELDS = fields
        # Precomputed for the hot paths (`__init__`, `wire_fields`).
        cls._DEFAULTS = {name: default for name, (_, default) in fields.items() if default is not REQUIRED}
        cls._NONE_DEFAULTS = tuple(name for name, default in cls._DEFAULTS.items() if default is None)

    _DEFAULTS: ClassVar[dict[str, Any]] = {}
    _NONE_DEFAULTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **values: Any) -> None:
        if len(values) != len(self.FIELDS) or values.keys() != self.FIELDS.keys():
            values = {**self._DEFAULTS, **values}
            if values.keys() != self.FIELDS.keys():
                missing = [name for name in self.FIELDS if name not in values]
                if missing:
                    raise TypeError(f"{type(self).__name__} needs field {missing[0]!r}")
                unknown = sorted(set(values) - set(self.FIELDS))
                raise TypeError(f"{type(self).__name__} has no field {unknown[0]!r}")
        self.__dict__.update(values)

    @classmethod
    def from_wire(cls, raw: dict, where: str) -> Record:
        """Check a map from a peer against the declaration; build the record.

        `where` names what is being read (the op, "reply to 'get_data'").

        Raises:
            ProtocolError: a field is missing, unknown, mistyped or out of
                bounds (the message names which, and where).
        """
        try:
            return cls.check(raw)
        except FieldError as exc:
            raise ProtocolError(exc.text(where)) from None

    @classmethod
    def check(cls, raw: dict) -> Record:
        """`from_wire` without the op's name: raises `FieldError`."""
        values = {}
        present = 0
        for name, (kind, default) in cls.FIELDS.items():
            value = raw.get(name, REQUIRED)
            if value is REQUIRED:
                if default is REQUIRED:
                    raise FieldError(f"lacks field {name!r}")
                values[name] = default
                continue
            present += 1
            if value is None and default is None:
                values[name] = None
            else:
                try:
                    values[name] = kind.check(value)
                except FieldError as exc:
                    exc.path.append(f".{name}")
                    raise
        if len(raw) > present:
            for name in raw:
                if name not in cls.FIELDS and name not in cls._TRANSPORT_FIELDS:
                    raise FieldError(f"has an unknown field {clip(name, 60)}")
        record = cls.__new__(cls)
        record.__dict__.update(values)
        if cls.check_fields is not None:
            record.check_fields()
        return record

    # Fields the transport adds around a record (the op, a request id).
    _TRANSPORT_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def wire_fields(self) -> dict[str, Any]:
        """The fields as they travel: optional fields left at None are omitted."""
        out = {name: self.__dict__[name] for name in self.FIELDS}
        for name in self._NONE_DEFAULTS:
            if out[name] is None:
                del out[name]
        if self.TAG is not None:
            out[self.TAG[0]] = self.TAG[1]
        return out

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={clip(v, 60)}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({body})"
