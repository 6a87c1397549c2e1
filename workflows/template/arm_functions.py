"""The ARM template functions whose result depends on their arguments alone, as ARM defines them: string
functions (`concat`, `format`, `uri`, `toLower`, `toUpper`, `replace`, `guid`, `uniqueString`), conversions
(`string`, `int`, `bool`), and the logical and comparison functions conditions are written with (`empty`,
`coalesce`, `equals`, `not`, `and`, `or`, `true`, `false`, `null`).

`guid` and `uniqueString` hash as ARM does, so a name made with them here is the name ARM would make:
`guid` is a version-5 UUID (SHA-1) of the arguments joined by '-' in ARM's namespace; `uniqueString` is ARM's
64-bit MurmurHash variant of the same string, as 13 base-32 characters.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any


class ArmError(Exception):
    """An expression that cannot be evaluated; its text says why, and goes into the issue at its path."""


def arm_text(value: Any) -> str:
    """A value as ARM's `string()` writes it: booleans as .NET writes them (True), objects and arrays as compact JSON."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _strings(function: str, args: list[Any], *, count: int | None = None) -> list[str]:
    """`args` when all are strings (`count` of them, if given, else at least one)."""
    if (count is None and not args) or (count is not None and len(args) != count):
        wanted = f"{count} string argument{'s' if count != 1 else ''}" if count is not None else "string arguments"
        raise ArmError(f"{function}() takes {wanted}, not {len(args)}")
    for arg in args:
        if not isinstance(arg, str):
            raise ArmError(f"{function}() takes strings, not {json.dumps(arg)}")
    return args


def _booleans(function: str, args: list[Any]) -> list[bool]:
    if len(args) < 2 or not all(isinstance(a, bool) for a in args):
        raise ArmError(f"{function}() takes two or more true or false values")
    return args


def _concat(args: list[Any]) -> Any:
    """Arrays into one array, or values into one string."""
    if args and all(isinstance(a, list) for a in args):
        return [item for a in args for item in a]
    if any(isinstance(a, (list, dict)) for a in args):
        raise ArmError("concat() takes only strings, or only arrays")
    return "".join(arm_text(a) for a in args)


# {index[,alignment][:formatString]}, as .NET's composite formatting reads it.
_FORMAT_ITEM = re.compile(r"\{(\d+)(?:,\s*(-?\d+))?(?::([^{}]*))?\}")


def _formatted(value: Any, spec: str | None) -> str:
    """One value of format(), with the numeric format strings ARM templates use (N, D, X, F)."""
    if not spec:
        return arm_text(value)
    kind, digits = spec[0], spec[1:]
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or kind.upper() not in "NDXF"
        or not digits.isdigit()
        and digits
    ):
        raise ArmError(f"format(): the format string '{spec}' is not supported for {json.dumps(value)}")
    places = int(digits) if digits else None
    if kind.upper() == "N":
        return f"{value:,.{2 if places is None else places}f}"
    if kind.upper() == "F":
        return f"{value:.{2 if places is None else places}f}"
    sign, magnitude = ("-" if value < 0 else ""), abs(value)
    text = f"{magnitude:X}" if kind == "X" else f"{magnitude:x}" if kind == "x" else str(magnitude)
    return sign + text.zfill(places or 0)


def _format(args: list[Any]) -> str:
    """format(formatString, arg1, ...): .NET composite formatting, `{0}` to `{n}` (with `{{` and `}}` for braces)."""
    if not args or not isinstance(args[0], str):
        raise ArmError("format() takes a format string and the values it names")
    text, values, out, position = args[0], args[1:], [], 0
    while position < len(text):
        if text.startswith(("{{", "}}"), position):
            out.append(text[position])
            position += 2
        elif text[position] == "{":
            item = _FORMAT_ITEM.match(text, position)
            if not item:
                raise ArmError(f"format(): '{text[position:]}' is not a format item such as {{0}}")
            index = int(item[1])
            if index >= len(values):
                raise ArmError(f"format(): {{{index}}} has no value (there are {len(values)})")
            value = _formatted(values[index], item[3])
            width = int(item[2] or 0)
            out.append(value.rjust(width) if width > 0 else value.ljust(-width))
            position = item.end()
        elif text[position] == "}":
            raise ArmError("format(): a '}' that closes no format item (write '}}' for a brace)")
        else:
            out.append(text[position])
            position += 1
    return "".join(out)


def _uri(args: list[Any]) -> str:
    """uri(baseUri, relativeUri): relativeUri after baseUri up to its last '/'; a '/' starting relativeUri is
    merged with the one ending baseUri."""
    base, relative = _strings("uri", args, count=2)
    scheme, separator, rest = base.partition("://")
    if not separator or not scheme:
        raise ArmError(f"uri() needs an absolute base URI, not '{base}'")
    if "://" in relative:
        return relative
    if not base.endswith("/"):
        base = base[: base.rfind("/") + 1] if "/" in rest else base + "/"
    return base + relative.removeprefix("/")


def _replace(args: list[Any]) -> str:
    original, old, new = _strings("replace", args, count=3)
    if not old:
        raise ArmError("replace() cannot replace an empty string")
    return original.replace(old, new)


# ARM's namespace for guid() (a version-5 UUID of the arguments joined by '-').
_GUID_NAMESPACE = uuid.UUID("11fb06fb-712d-4ddd-98c7-e71bbd588830")


def _guid(args: list[Any]) -> str:
    return str(uuid.uuid5(_GUID_NAMESPACE, "-".join(_strings("guid", args))))


_U32 = 0xFFFFFFFF
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (32 - bits))) & _U32


def _mix(value: int) -> int:
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & _U32
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & _U32
    return value ^ (value >> 16)


def _murmur64(data: bytes) -> int:
    """ARM's 64-bit MurmurHash variant (seed 0): two 32-bit lanes over 8-byte blocks, little-endian."""
    c1, c2 = 0xAB0E9789, 0x239B961B
    h1 = h2 = 0
    whole = len(data) - len(data) % 8
    for at in range(0, whole, 8):
        k1 = _rotl((int.from_bytes(data[at : at + 4], "little") * c2) & _U32, 15) * c1 & _U32
        h1 = (_rotl(h1 ^ k1, 19) + h2) & _U32
        h1 = (h1 * 5 + 0x561CCD1B) & _U32
        k2 = _rotl((int.from_bytes(data[at + 4 : at + 8], "little") * c1) & _U32, 17) * c2 & _U32
        h2 = (_rotl(h2 ^ k2, 13) + h1) & _U32
        h2 = (h2 * 5 + 0x0BCAA747) & _U32
    tail = data[whole:]
    if tail:
        h1 ^= _rotl((int.from_bytes(tail[:4], "little") * c2) & _U32, 15) * c1 & _U32
        if len(tail) > 4:
            h2 ^= _rotl((int.from_bytes(tail[4:], "little") * c1) & _U32, 17) * c2 & _U32
    h1 ^= len(data)
    h2 ^= len(data)
    h1 = (h1 + h2) & _U32
    h2 = (h2 + h1) & _U32
    h1, h2 = _mix(h1), _mix(h2)
    h1 = (h1 + h2) & _U32
    h2 = (h2 + h1) & _U32
    return (h2 << 32) | h1


def _unique_string(args: list[Any]) -> str:
    digest = _murmur64("-".join(_strings("uniqueString", args)).encode())
    # 13 characters of 5 bits from the top; the last has the lowest 4 bits and a 0.
    return "".join(_BASE32[((digest << (5 * i)) & 0xFFFFFFFFFFFFFFFF) >> 59] for i in range(13))


def _one(function: str, args: list[Any]) -> Any:
    if len(args) != 1:
        raise ArmError(f"{function}() takes one value, not {len(args)}")
    return args[0]


def _empty(args: list[Any]) -> bool:
    value = _one("empty", args)
    if value is not None and not isinstance(value, (str, list, dict)):
        raise ArmError(f"empty() takes a string, an array or an object, not {json.dumps(value)}")
    return not value


def _coalesce(args: list[Any]) -> Any:
    if not args:
        raise ArmError("coalesce() takes at least one value")
    return next((a for a in args if a is not None), None)


def _int(args: list[Any]) -> int:
    value = _one("int", args)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ArmError(f"int() takes a whole number or a string of one, not {json.dumps(value)}")


def _bool(args: list[Any]) -> bool:
    value = _one("bool", args)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ArmError(f"bool() takes true, false, 'true', 'false' or a number, not {json.dumps(value)}")


def _same(left: Any, right: Any) -> bool:
    """ARM's equals(): values of one type with equal contents (true is not 1)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, list):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same(v, right[k]) for k, v in left.items())
    return left == right


def _not(args: list[Any]) -> bool:
    value = _one("not", args)
    if not isinstance(value, bool):
        raise ArmError(f"not() takes true or false, not {json.dumps(value)}")
    return not value


def _equals(args: list[Any]) -> bool:
    if len(args) != 2:
        raise ArmError(f"equals() takes two values, not {len(args)}")
    return _same(*args)


def _none(function: str) -> Callable[[list[Any]], Any]:
    def call(args: list[Any]) -> Any:
        if args:
            raise ArmError(f"{function}() takes no arguments")
        return {"true": True, "false": False, "null": None}[function]

    return call


# By ARM's names; ARM matches function names in any case.
FUNCTIONS: dict[str, Callable[[list[Any]], Any]] = {
    "concat": _concat,
    "format": _format,
    "uri": _uri,
    "toLower": lambda args: _strings("toLower", args, count=1)[0].lower(),
    "toUpper": lambda args: _strings("toUpper", args, count=1)[0].upper(),
    "replace": _replace,
    "guid": _guid,
    "uniqueString": _unique_string,
    "string": lambda args: arm_text(_one("string", args)),
    "int": _int,
    "bool": _bool,
    "empty": _empty,
    "coalesce": _coalesce,
    "equals": _equals,
    "not": _not,
    "and": lambda args: all(_booleans("and", args)),
    "or": lambda args: any(_booleans("or", args)),
    "true": _none("true"),
    "false": _none("false"),
    "null": _none("null"),
}
