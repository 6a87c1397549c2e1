"""`properties.customize` and `properties.validate`: the steps run in the build VM (customizers) and in the
VM made from the built image (validators), told apart by `type`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field
from pydantic_core import InitErrorDetails

from workflows.template.api_versions import Since
from workflows.template.base import AibModel, broken_rule, given, input_field
from workflows.template.formats import DEFAULT_RESTART_TIMEOUT, NonEmpty, RestartTimeout, Sha256


def _script_rules(data: dict) -> Iterator[InitErrorDetails]:
    script, inline = given(input_field(data, "scriptUri")), given(input_field(data, "inline"))
    if script == inline:
        has = "both" if script else "neither"
        yield broken_rule(f"Exactly one of 'scriptUri' or 'inline' can be specified; this step has {has}.", data)


class ShellCustomizer(AibModel):
    """Runs a shell script (Linux), from `scriptUri` or `inline` commands; a non-zero exit fails the build."""

    type: Literal["Shell"]
    name: str = ""
    script_uri: str | None = None
    inline: list[str] | None = None
    sha256_checksum: Sha256 = ""

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        yield from _script_rules(data)


class PowerShellCustomizer(AibModel):
    """Runs a PowerShell script (Windows); `validExitCodes` lists the exit codes that count as success."""

    type: Literal["PowerShell"]
    name: str = ""
    script_uri: str | None = None
    inline: list[str] | None = None
    sha256_checksum: Sha256 = ""
    run_elevated: bool = False
    run_as_system: bool = Field(False, description="Run as Local System; can only be true when runElevated is true.")
    valid_exit_codes: list[int] = [0]

    @classmethod
    def _rules(cls, data: dict) -> Iterator[InitErrorDetails]:
        yield from _script_rules(data)
        if input_field(data, "runAsSystem") is True and input_field(data, "runElevated") is not True:
            yield broken_rule("'runAsSystem' can only be true when 'runElevated' is true.", data, "runAsSystem")


class FileCustomizer(AibModel):
    """Downloads one file to `destination` on the build VM (whose parent directory must exist)."""

    type: Literal["File"]
    name: str = ""
    source_uri: NonEmpty
    destination: NonEmpty
    sha256_checksum: Sha256 = ""


class WindowsRestartCustomizer(AibModel):
    """Restarts a Windows build VM and waits for it; there is no Linux equivalent in AIB."""

    type: Literal["WindowsRestart"]
    name: str = ""
    restart_command: str = 'shutdown /r /f /t 0 /c "packer restart"'
    restart_check_command: str = ""
    restart_timeout: RestartTimeout = DEFAULT_RESTART_TIMEOUT


class WindowsUpdateCustomizer(AibModel):
    """Installs Windows updates, restarting as needed; `updateLimit` 0 means 1000."""

    type: Literal["WindowsUpdate"]
    name: str = ""
    search_criteria: str = ""
    filters: list[str] = []
    update_limit: int = Field(0, ge=0)


Customizer = Annotated[
    ShellCustomizer | PowerShellCustomizer | FileCustomizer | WindowsRestartCustomizer | WindowsUpdateCustomizer,
    Field(discriminator="type"),
]


class FileValidator(FileCustomizer):
    """Downloads one file to `destination` on the validation VM (whose parent directory must exist)."""

    since = Since("2022-07-01")


Validator = Annotated[ShellCustomizer | PowerShellCustomizer | FileValidator, Field(discriminator="type")]


class Validation(AibModel):
    """Checks run on a VM made from the built image; a failure fails the run even when distributed."""

    continue_distribute_on_failure: bool = Field(
        False, description="Distribute the image even when validation fails (the run is still reported Failed)."
    )
    source_validation_only: bool = Field(False, description="Validate the source image itself; no build is run.")
    in_vm_validations: list[Validator] = Field([], alias="inVMValidations", description="Validation steps, in order.")
