"""The layout of customization.log and validation.log, as Packer writes them under AIB.

AIB users find a step in these logs by Packer's markers: ``(telemetry) Starting provisioner shell``, the
``==> azure-arm:`` lines of the builder, the step's output indented under ``    azure-arm:``, and Packer's own
failure line ``Script exited with non-zero exit status: 1. Allowed exit codes are: [0]``. kiln writes the same
markers on every cloud, with the step's label in its first line, so a worker that takes a step over finds the
step's section again and knows how much of the script's output it already holds.
"""

from __future__ import annotations

# The name AIB's Packer gives its one build (and its builder type): the log's prefix and PACKER_BUILD_NAME.
BUILDER = "azure-arm"
_NOTE = f"==> {BUILDER}: "
# The Packer provisioner each AIB step type runs through, by which the log names it.
PROVISIONERS = {
    "Shell": "shell",
    "PowerShell": "powershell",
    "File": "file",
    "WindowsRestart": "windows-restart",
    "WindowsUpdate": "windows-update",
}
_OUTPUT = f"    {BUILDER}: ".encode()


def note(text: str) -> bytes:
    """kiln's own lines (what runs, how it ended), each marked as the builder's."""
    return "".join(f"{_NOTE}{line}\n" for line in text.splitlines()).encode()


def step_header(label: str, provisioner: str) -> bytes:
    """What opens a step's section: Packer's telemetry marker, then the builder line that names the step."""
    return (
        f"\n(telemetry) Starting provisioner {provisioner}\n{_NOTE}Provisioning with {provisioner}: {label}\n".encode()
    )


def step_end(label: str, provisioner: str, exit_code: int, valid_exit_codes: list[int]) -> bytes:
    """What closes a step's section: its exit code, Packer's failure line when that code is not allowed, and the
    telemetry marker that ends the provisioner."""
    lines = [f"{label}: exit code {exit_code}"]
    if exit_code not in valid_exit_codes:
        lines.append(
            f"Script exited with non-zero exit status: {exit_code}. Allowed exit codes are: {valid_exit_codes}"
        )
    return note("\n".join(lines)) + provisioner_end(provisioner)


def provisioner_end(provisioner: str) -> bytes:
    return f"(telemetry) ending {provisioner}\n".encode()


class OutputFramer:
    """Indents a script's output under the builder's prefix, line by line, across chunks that split lines."""

    def __init__(self, *, at_line_start: bool = True) -> None:
        self.at_line_start = at_line_start

    def frame(self, chunk: bytes) -> bytes:
        lines = chunk.splitlines(keepends=True)
        framed = [(_OUTPUT if i or self.at_line_start else b"") + line for i, line in enumerate(lines)]
        if lines:
            self.at_line_start = lines[-1].endswith((b"\n", b"\r"))
        return b"".join(framed)


def section_output(log: bytes, label: str, provisioner: str) -> bytes | None:
    """A step's own script output as ``log`` holds it, without the builder's prefix; None if no attempt began the
    step.

    The section runs from the step's header to its first ``==> azure-arm: <label>:`` note (or the log's end), and
    every line in it is the script's output under the builder's prefix.
    """
    header = step_header(label, provisioner)
    at = log.rfind(header)
    if at < 0:
        return None
    section = log[at + len(header) :]
    end = section.find(f"{_NOTE}{label}: ".encode())
    return raw_output(section if end < 0 else section[:end])


def logged_output(log: bytes, label: str, provisioner: str) -> tuple[int, bool] | None:
    """How many bytes of a step's own output ``log`` holds, and whether the last of it ended a line; None if no
    attempt began the step."""
    raw = section_output(log, label, provisioner)
    if raw is None:
        return None
    return len(raw), not raw or raw.endswith((b"\n", b"\r"))


def raw_output(section: bytes) -> bytes:
    """The script's own bytes in a section of framed output: each line without the builder's prefix."""
    return b"".join(line.removeprefix(_OUTPUT) for line in section.splitlines(keepends=True))
