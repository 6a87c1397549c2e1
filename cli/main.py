"""``kiln``: build images from Azure VM Image Builder templates, each build a Temporal workflow.

Exit codes: 0 succeeded, 1 failed, 2 bad input (an invalid template, an unknown build, Temporal unreachable;
nothing was started), 3 partially succeeded, 130 canceled (or Ctrl-C, which only stops watching), 141 the
output's reader went away (`kiln schema | head`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.text import Text
from temporalio.service import RPCError

from activities.clouds.registry import CLOUDS
from activities.connection import ConnectError
from cli import commands
from cli.builds import EXIT_BROKEN_PIPE, EXIT_CANCELED, EXIT_FAILED, EXIT_USAGE, UsageError
from workflows.models import RunState


def run_state(value: str) -> str:
    """``--state`` in any case, checked against AIB's run states."""
    for state in RunState:
        if state.value.lower() == value.lower():
            return state.value
    raise argparse.ArgumentTypeError(f"{value!r} is not a run state ({', '.join(RunState)})")


def positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number")
    return int(value)


def duration(value: str) -> timedelta:
    """``30m``, ``1h``, ``1d``: how often a schedule runs, or how long a build may still take."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if len(value) < 2 or value[-1] not in units or not value[:-1].isdigit() or int(value[:-1]) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration like 30m, 1h or 1d")
    return timedelta(**{units[value[-1]]: int(value[:-1])})


def connection_options(default: object) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False, argument_default=default)
    options.add_argument("--address", help="Temporal host:port (default: TEMPORAL_ADDRESS or localhost:7233)")
    options.add_argument("--namespace", help="Temporal namespace (default: TEMPORAL_NAMESPACE or default)")
    return options


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="kiln",
        description="Build VM images from Azure VM Image Builder templates, each build a durable Temporal workflow.",
        epilog=__doc__.split("\n\n", 1)[1],
        parents=[connection_options(None)],
    )
    sub = root.add_subparsers(title="commands", required=True, metavar="COMMAND")

    # The connection options work after the command too (`kiln list --address X`); SUPPRESS keeps the
    # command's copy from overwriting a value given before it.
    connection = connection_options(argparse.SUPPRESS)

    def command(name: str, handler: object, text: str, *, remote: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, parents=[connection] if remote else [])
        p.set_defaults(handler=handler)
        return p

    def template_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", type=Path, help="AIB template JSON (plain, or an ARM deployment template)")
        p.add_argument("--parameters", type=Path, help="ARM parameters file for a deployment template")
        p.add_argument("--cloud", choices=sorted(CLOUDS), default="local", help="where to build (default: local)")
        deployment = p.add_argument_group(
            "deployment", "where an ARM deployment template is deployed: what resourceGroup() and subscription() read"
        )
        deployment.add_argument("--subscription", metavar="ID", help="the subscription id")
        deployment.add_argument("--resource-group", metavar="NAME", help="the resource group's name")
        deployment.add_argument("--location", metavar="REGION", help="the resource group's region")

    p = command("build", commands.build, "validate a template and start a build, then show it until it ends")
    template_arguments(p)
    p.add_argument("--name", help="build name (default: the ARM resource name, else the file name)")
    p.add_argument("--no-wait", action="store_true", help="start the build and return")

    p = command("watch", commands.watch, "show a build's progress until it ends")
    p.add_argument("name")

    p = command("status", commands.status, "show a build's status, steps and outputs")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the status as JSON (AIB's field names)")

    p = command("list", commands.list_builds, "list builds, running ones first")
    p.add_argument("--state", type=run_state, help=f"only builds in this run state ({', '.join(RunState)})")
    p.add_argument("--limit", type=positive, default=20, help="at most this many (default: 20)")

    p = command("cancel", commands.cancel, "cancel a running build and wait for its cleanup")
    p.add_argument("name")

    p = command("logs", commands.logs, "print a build's customization.log")
    p.add_argument("name")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the build ends")
    p.add_argument("--validation", action="store_true", help="print validation.log instead")

    p = command("validate", commands.validate, "check a template without building it", remote=False)
    template_arguments(p)

    command("schema", commands.schema, "print the JSON Schema of AIB templates as kiln reads them", remote=False)

    gallery = sub.add_parser("gallery", help="local galleries (the local cloud's Azure Compute Gallery)")
    gallery_sub = gallery.add_subparsers(title="gallery commands", required=True, metavar="COMMAND")
    p = gallery_sub.add_parser("create", help="make a local gallery and image definition for SharedImage targets")
    p.set_defaults(handler=commands.gallery_create)
    p.add_argument(
        "image_definition_id",
        help="/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/galleries/<gallery>/images/<name>",
    )
    p.add_argument("--location", default="westeurope", help="the gallery's region (default: westeurope)")
    p.add_argument("--publisher", default="kiln")
    p.add_argument("--offer", default="golden")
    p.add_argument("--sku", default="1")
    p.add_argument("--os-type", choices=["Linux", "Windows"], default="Linux")
    p.add_argument("--hyper-v-generation", choices=["V1", "V2"], default="V2")
    p = gallery_sub.add_parser("list", help="local galleries, image definitions and versions")
    p.set_defaults(handler=commands.gallery_list)

    p = command("bases", commands.bases, "the local cloud's Debian base images, and making new ones", remote=False)
    p.add_argument(
        "--rebuild",
        nargs="?",
        const="",
        metavar="OFFER",
        help="make a new version now: of OFFER's release (debian-12, debian-13), or of every release made so far",
    )

    p = command("export", commands.export, "write an output of a finished local build as qcow2, raw, vmdk or vhdx")
    p.add_argument("name", help="the build")
    p.add_argument("file", type=Path, help="the disk file to write (its suffix names the format)")
    p.add_argument("--format", choices=["qcow2", "raw", "vmdk", "vhdx"], help="the format, if not the suffix's")
    p.add_argument("--run-output", metavar="NAME", help="which output, when the build has several")

    p = command("deadline", commands.deadline, "move a running build's deadline to DURATION from now")
    p.add_argument("name")
    p.add_argument("duration", type=duration, help="from now, e.g. 30m or 2h")

    p = command("janitor", commands.janitor, "finish cleanups builds left (terminated, or an undo refused)")
    p.add_argument("--cloud", choices=sorted(CLOUDS), default="local", help="whose builds (default: local)")
    p.add_argument("--every", type=duration, help="keep running on a schedule, e.g. 1h or 30m, instead of once")

    p = command("resources", commands.resources, "what the local cloud has made, from its resource store")
    p.add_argument("--orphans", action="store_true", help="only temporary resources of builds no longer running")
    p = command(
        "codec-server", commands.codec_server, "decrypt payloads for the Web UI and the temporal CLI", remote=False
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=positive, default=8081, help="port to listen on (default: 8081)")
    p.add_argument(
        "--ui-origin",
        action="append",
        default=None,
        metavar="URL",
        help="a Web UI address allowed to call it, e.g. http://127.0.0.1:8233 (repeatable; * for any; "
        "default: the dev server's UI)",
    )

    p = command("codec-key", commands.codec_key, "print a new payload key entry (KEY_ID:BASE64_KEY)", remote=False)
    p.add_argument("key_id", help="the key's id, stored beside each payload it seals (e.g. 2026-12)")
    return root


def console(*, stderr: bool = False) -> Console:
    """A console that, writing to a file or pipe, does not squeeze tables into 80 columns."""
    terminal = Console(stderr=stderr).is_terminal
    return Console(stderr=stderr, highlight=False, width=None if terminal or "COLUMNS" in os.environ else 160)


def run(argv: Sequence[str]) -> int:
    """Run one command and return its exit code; errors are reported here, once, with what was wrong."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error argparse has already printed
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    io = commands.Io(out=console(), err=console(stderr=True))
    try:
        return asyncio.run(args.handler(args, io))
    except KeyboardInterrupt:
        return EXIT_CANCELED
    except (UsageError, ConnectError) as err:
        io.err.print(Text(f"kiln: {err}", style="red"), soft_wrap=True)
        return EXIT_USAGE
    except RPCError as err:
        io.err.print(Text(f"kiln: Temporal refused the request: {err}", style="red"), soft_wrap=True)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """The console entry point. Called with ``argv`` (tests, scripts) it returns the exit code.

    As the ``kiln`` command it ends the process with ``os._exit``: letting the interpreter finalize while the
    Temporal client's native threads are alive can abort with ``PyGILState_Release`` (sdk-python#300).
    """
    if argv is not None:
        return run(argv)
    try:
        code = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`kiln schema | head`): stop quietly, as a shell tool killed by SIGPIPE does.
        code = EXIT_BROKEN_PIPE
    except Exception:
        traceback.print_exc()
        code = EXIT_FAILED
    sys.stderr.flush()
    os._exit(code)
