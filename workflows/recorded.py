"""Models rebuilt from what a workflow's history recorded, without judging them again.

A template is validated once, in the ``validate_template`` local activity, and history records the template as
it was accepted. Decoding that record through pydantic would run the template model's rules again on every
replay, with the replaying worker's rules: one added since would refuse a template the build already accepted,
and the replay would fail. The same goes for an undo's request, which carries a distribution target.
"""

from __future__ import annotations

from types import NoneType, UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def rebuild(model: type[M], data: dict[str, Any]) -> M:
    """``data``, a model dumped to JSON (``model_dump(mode="json")``), as that model again, with no validator run.

    Only for data a model of ``model`` was dumped to: nothing is checked, and values stay as JSON has them (kiln's
    recorded models hold no dates or enums that JSON would turn into strings).

    Args:
        model: the model ``data`` was dumped from.
        data: its fields by their JSON names.

    Returns:
        A model equal to the one that was dumped.
    """
    fields = {
        name: _value(info.annotation, data[info.alias or name])
        for name, info in model.model_fields.items()
        if (info.alias or name) in data
    }
    return model.model_construct(**fields)


def _value(annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(annotation)
    if origin is Annotated:
        return _value(get_args(annotation)[0], value)
    if origin in (Union, UnionType):
        return _value(_member(get_args(annotation), value), value)
    if origin is list:
        (item,) = get_args(annotation)
        return [_value(item, v) for v in value]
    if origin is dict:
        _, item = get_args(annotation)
        return {key: _value(item, v) for key, v in value.items()}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return rebuild(annotation, value)
    return value


def _member(members: tuple[Any, ...], value: Any) -> Any:
    """The member of a union that ``value`` was dumped from: the only one besides None, or the model whose
    ``type`` literal is the value's (every union of models in kiln is discriminated by ``type``)."""
    candidates = [m for m in members if m is not NoneType]
    if len(candidates) == 1:
        return candidates[0]
    models = [m for m in candidates if isinstance(m, type) and issubclass(m, BaseModel)]
    if not models or not isinstance(value, dict):
        return Any  # a plain JSON value: it is already what it was
    for member in models:
        field = member.model_fields.get("type")
        if field is not None and value.get("type") in get_args(field.annotation):
            return member
    raise ValueError(f"no model of {members} has type {value.get('type')!r}")
