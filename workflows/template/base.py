"""AibModel, the strict base of every template model, and the cross-field rules it checks beside its fields:
as AIB does, it matches field names case-sensitively, coerces no JSON types and rejects unknown fields
(naming the closest known one), and a model's rules (`_rules`) read its raw input, so a rule broken in a
model whose fields are also wrong is reported together with them. kiln's own errors carry their finished
message under the kinds below, which errors.py words as AIB does.

Validated with an `ApiContext` (pydantic's validation context), a model also checks its fields against the
template's API version: a field that version does not have is an unknown field (`Since`), and one it requires
is missing (`RequiredBefore`); a model (a step type) that version does not have, set by its `since`, is refused at
its `type`, as AIB refuses a type its discriminator does not know. Whether an unknown field is then refused or dropped is the caller's decision
(see loading.py): it depends on the version too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from workflows.camel import CamelModel
from workflows.template.api_versions import ApiContext, RequiredBefore, Since, is_before, marker, version_note

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


def _version_notes(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Say in each field's JSON schema description from which API version it is there, or until which required;
    and in the model's own, from which version a model with a `since` is."""
    since = getattr(model, "since", None)
    if since is not None:
        note = version_note([since])
        schema["description"] = f"{schema['description']} {note}" if schema.get("description") else note
    for name, info in model.model_fields.items():
        note = version_note(info.metadata)
        field = schema.get("properties", {}).get(info.alias or name)
        if note and field is not None:
            field["description"] = f"{field['description']} {note}" if field.get("description") else note


class AibModel(CamelModel):
    """Strict as AIB 2024-02-01 is: no type coercion, unknown fields rejected, cross-field rules checked."""

    model_config = ConfigDict(
        extra="forbid", strict=True, field_title_generator=_json_title, json_schema_extra=_version_notes
    )

    since: ClassVar[Since | None] = None
    """A model (a `type` of a step) that AIB's API has only from this version on."""

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        # Rules read the raw input, so they are reported even when some field of this model is invalid.
        broken: list[InitErrorDetails] = []
        if isinstance(data, dict):
            context = info.context if isinstance(info.context, ApiContext) else ApiContext()
            broken = [*cls._version_rules(data, context.api_version), *cls._rules(data)]
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
    def _version_rules(cls, data: dict, api_version: str) -> Iterator[InitErrorDetails]:
        """The fields of `data` that API `api_version` does not have, and those it requires but are not given; or
        the model itself (its `type`), when that version does not have it."""
        if cls.since is not None and is_before(api_version, cls.since.version):
            message = (
                f"Type '{input_field(data, 'type')}' is not one API version {api_version} has here: "
                f"it came in {cls.since.version}."
            )
            yield broken_rule(message, data, "type")
        for name, info in cls.model_fields.items():
            alias = info.alias or name
            since = marker(info.metadata, Since)
            if since and alias in data and is_before(api_version, since):
                message = f"Unknown field '{alias}' for API version {api_version}: it came in {since}."
                yield _located(UNKNOWN_FIELD, message, (alias,), data, {"since": since})
            required_before = marker(info.metadata, RequiredBefore)
            if required_before and not given(data.get(alias)) and is_before(api_version, required_before):
                message = (
                    f"Missing field '{alias}': API version {api_version} requires it "
                    f"(from {required_before} on, it is optional)."
                )
                yield broken_rule(message, data, alias)

    @classmethod
    def _explain(cls, error: ErrorDetails) -> InitErrorDetails:
        """Carry a field error up unchanged, naming the closest known field for an unknown one (and, when the
        name differs from a known one only in case, that field, for API versions that match names in any case)."""
        loc = error["loc"]
        if error["type"] == "extra_forbidden" and len(loc) == 1:
            message, same_name = cls._unknown_field(str(loc[0]))
            return _located(
                UNKNOWN_FIELD, message, loc, error["input"], {"same_name": same_name} if same_name else None
            )
        return _located(error["type"], error["msg"], loc, error["input"], error.get("ctx"))

    @classmethod
    def _unknown_field(cls, key: str) -> tuple[str, str | None]:
        """The message for an unknown field, and the known field it names in another case (if it does)."""
        known = [info.alias or name for name, info in cls.model_fields.items()]
        folded = {k.lower(): k for k in known}
        match = difflib.get_close_matches(key.lower().replace("_", ""), list(folded), n=1, cutoff=0.6)
        if not match:
            return f"Unknown field '{key}'. Fields allowed here: {', '.join(known)}.", None
        hint, same_name = "", None
        if match[0] == key.lower():
            hint, same_name = " Field names are case-sensitive.", folded[match[0]]
        elif match[0] == key.lower().replace("_", ""):
            hint = " Field names are camelCase."
        return f"Unknown field '{key}'; did you mean '{folded[match[0]]}'?{hint}", same_name
