"""Pure helpers that read a template into what a build does: no I/O, callable from workflows, activities and tests."""

from __future__ import annotations

from workflows.models import GuestStep
from workflows.template import ImageTemplate


def guest_steps(template: ImageTemplate) -> list[tuple[str, GuestStep]]:
    """Every customizer and validator with its JSON path, in the order they run."""
    steps: list[tuple[str, GuestStep]] = [
        (f"properties.customize[{i}]", s) for i, s in enumerate(template.properties.customize)
    ]
    if template.properties.validation is not None:
        steps += [
            (f"properties.validate.inVMValidations[{i}]", s)
            for i, s in enumerate(template.properties.validation.in_vm_validations)
        ]
    return steps
