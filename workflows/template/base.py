"""AibModel, the strict base of every template model, and the cross-field rules it checks beside its fields:
as AIB does, it matches field names case-sensitively, coerces no JSON types and rejects unknown fields
(naming the closest known one), and a model's rules (`_rules`) read its raw input, so a rule broken in a
model whose fields are also wrong is reported together with them. kiln's own errors carry their finished
message under the kinds below, which errors.py words as AIB does.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidatorFunctionWrapHandler, model_validator
from pydantic.alias_generators import to_camel, to_snake
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from workflows.camel import CamelModel

# The kinds of error kiln raises itself; their message is final, not pydantic's.
BAD_VALUE = "bad_value"
UNKNOWN_FIELD = "unknown_field"
RULE = "rule"


def _kiln_error(kind: str, message: str, ctx: dict | None = None) -> PydanticCustomError:
    """A pydantic error carrying kiln's finished message, with pydantic's context (if any) kept beside it."""
    # kiln_msg goes last: pydantic-core substitutes context keys in order, so the finished text is not rescanned.
    return PydanticCustomError(kind, "{kiln_msg}", {**(ctx or {}), "kiln_msg": message})


def bad_value(explanation: str) -> PydanticCustomError:
    """A value of the right type but not allowed; the message adds 'Field ... has a bad value' around it."""
    return _kiln_error(BAD_VALUE, explanation)


def given(value: object) -> bool:
    """AIB reads null, "" and [] as "not set"."""
    return value is not None and value != "" and value != []


def input_field(data: object, alias: str) -> Any:
    """One field of a model's input by its JSON name: raw input (a dict) or an already built model."""
    if isinstance(data, BaseModel):
        for name, info in type(data).model_fields.items():
            if (info.alias or name) == alias:
                return getattr(data, name)
        return None
    if isinstance(data, dict):
        return data[alias] if alias in data else data.get(to_snake(alias))
    return None


def broken_rule(message: str, data: dict, *loc: str | int) -> InitErrorDetails:
    """A cross-field rule broken in `data`, located at `loc` relative to the model that checks it."""
    return _located(RULE, message, loc, data)


def _located(
    kind: str, message: str, loc: tuple[str | int, ...], value: object, ctx: dict | None = None
) -> InitErrorDetails:
    return InitErrorDetails(type=_kiln_error(kind, message, ctx), loc=loc, input=value)


def _json_title(name: str, info: Any) -> str:
    # Runs before the alias generator fills info.alias, so derive the JSON name the same way.
    return info.alias or to_camel(name)


class AibModel(CamelModel):
    """Strict as AIB 2024-02-01 is: no type coercion, unknown fields rejected, cross-field rules checked."""

    model_config = ConfigDict(extra="forbid", strict=True, field_title_generator=_json_title)

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Rules read the raw input, so they are reported even when some field of this model is invalid.
        broken = list(cls._rules(data)) if isinstance(data, dict) else []
        try:
            model = handler(data)
        except ValidationError as err:
            errors = [cls._explain(e) for e in err.errors(include_url=False)]
            raise ValidationError.from_exception_data(cls.__name__, [*errors, *broken]) from None
        if broken:
            raise ValidationError.from_exception_data(cls.__name__, broken)
        return model

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        """Cross-field rules of this model; each yields an error located relative to the model."""
        return iter(())

    @classmethod
    def _explain(cls, error: ErrorDetails) -> InitErrorDetails:
        """Carry a field error up unchanged, naming the closest known field for an unknown one."""
        loc = error["loc"]
        if error["type"] == "extra_forbidden" and len(loc) == 1:
            return _located(UNKNOWN_FIELD, cls._unknown_field(str(loc[0])), loc, error["input"])
        return _located(error["type"], error["msg"], loc, error["input"], error.get("ctx"))

    @classmethod
    def _unknown_field(cls, key: str) -> str:
        known = [info.alias or name for name, info in cls.model_fields.items()]
        folded = {k.lower(): k for k in known}
        match = difflib.get_close_matches(key.lower().replace("_", ""), list(folded), n=1, cutoff=0.6)
        if not match:
            return f"Unknown field '{key}'. Fields allowed here: {', '.join(known)}."
        hint = ""
        if match[0] == key.lower():
            hint = " Field names are case-sensitive."
        elif match[0] == key.lower().replace("_", ""):
            hint = " Field names are camelCase."
        return f"Unknown field '{key}'; did you mean '{folded[match[0]]}'?{hint}"
