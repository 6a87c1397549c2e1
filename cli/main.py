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
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.text import Text
from temporalio.service import RPCError

from activities.clouds.registry import CLOUDS
from activities.connection import ConnectError
from cli import commands
from cli import template_commands as golden
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

    def group(name: str, text: str, subject: str) -> Callable[..., argparse.ArgumentParser]:
        """A command with commands of its own (``kiln template create``), each naming a ``subject`` first."""
        commands_of = sub.add_parser(name, help=text).add_subparsers(
            title=f"{name} commands", required=True, metavar="COMMAND"
        )

        def add(verb: str, handler: object, text: str, *, named: bool = True) -> argparse.ArgumentParser:
            p = commands_of.add_parser(verb, help=text, description=text, parents=[connection])
            p.set_defaults(handler=handler)
            if named:
                p.add_argument("name", help=f"the {subject}'s name")
            return p

        return add

    template_command = group("template", "image templates kept as AIB keeps them, each run many times", "template")

    def webhook_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--webhook", action="append", metavar="URL", help="POST each build's end and trigger event here")
        p.add_argument(
            "--webhook-format",
            choices=["json", "slack", "teams"],
            default="json",
            help="the body's shape (default json)",
        )

    p = template_command("create", golden.template_create, "store a template (autoRun Enabled builds it at once)")
    template_arguments(p)
    webhook_arguments(p)
    p = template_command("update", golden.template_update, "store a new revision; the next run builds it")
    template_arguments(p)
    webhook_arguments(p)
    p = template_command("run", golden.template_run, "build the template now, then show the build until it ends")
    p.add_argument("--no-wait", action="store_true", help="start the build and return")
    template_command("cancel", golden.template_cancel, "cancel the template's running build")
    p = template_command("show", golden.template_show, "the template's lastRunStatus, trigger and runs")
    p.add_argument("--limit", type=positive, default=20, help="show this many of the newest runs (default: 20)")
    p.add_argument("--json", action="store_true", help="print everything the template holds as JSON")
    template_command("delete", golden.template_delete, "delete the template (refused while it builds)")
    template_command("list", golden.template_list, "every template", named=False)

    schedule_command = group("schedule", "rebuild a template on a cron schedule (Temporal Schedules)", "schedule")

    p = schedule_command("create", golden.schedule_create, "run a template on a cron schedule; a run never overlaps")
    p.add_argument("--template", required=True, help="the template to run")
    p.add_argument("--cron", required=True, metavar="EXPR", help="e.g. '0 3 * * 0' (Sundays 03:00)")
    p.add_argument("--timezone", default="UTC", help="the cron's time zone, e.g. Europe/Amsterdam (default: UTC)")
    p.add_argument("--jitter", type=duration, help="start each run up to this much later, e.g. 30m")
    p.add_argument(
        "--catchup-window", type=duration, help="runs missed while down, within this, still run (default 1h)"
    )
    p.add_argument(
        "--when",
        choices=["always", "source-changed"],
        help="build every time, or only when the source or template changed (default: source-changed for a latest "
        "source, else always)",
    )
    schedule_command("describe", golden.schedule_describe, "next runs and the last runs' results")
    p = schedule_command("pause", golden.schedule_pause, "stop starting runs until unpaused")
    p.add_argument("--note", help="why, shown by describe")
    schedule_command("unpause", golden.schedule_unpause, "start runs again")
    schedule_command("trigger", golden.schedule_trigger, "run now (skipped if the last run still builds)")
    p = schedule_command("backfill", golden.schedule_backfill, "run what the schedule would have run in a past window")
    p.add_argument("--start", required=True, type=datetime.fromisoformat, help="ISO time, e.g. 2026-11-01T00:00")
    p.add_argument("--end", required=True, type=datetime.fromisoformat, help="ISO time")
    schedule_command("delete", golden.schedule_delete, "delete the schedule")
    schedule_command("list", golden.schedule_list, "every schedule", named=False)

    triggers = sub.add_parser("trigger", help="a template's SourceImage trigger: build when its latest source moves")
    trigger_sub = triggers.add_subparsers(title="trigger commands", required=True, metavar="COMMAND")
    p = trigger_sub.add_parser("create", help="add the template's SourceImage trigger", parents=[connection])
    p.set_defaults(handler=golden.trigger_create)
    p.add_argument("template")
    p.add_argument("--name", default="source", help="the trigger's name (default: source)")
    p.add_argument("--interval", type=duration, default=timedelta(hours=1), help="how often to check (default 1h)")
    p.add_argument(
        "--failure-limit", type=positive, default=3, help="consecutive failed builds that deactivate it (default 3)"
    )
    for name, handler, text in (
        ("show", golden.trigger_show, "the trigger's status (Healthy or Unhealthy), with its message and time"),
        ("delete", golden.trigger_delete, "delete the trigger"),
    ):
        p = trigger_sub.add_parser(name, help=text, parents=[connection])
        p.set_defaults(handler=handler)
        p.add_argument("template")

    p = command("images", golden.images_list, "output versions with their lineage; `kiln images revoke` retires one")
    p.add_argument("--template", help="only this template's versions")
    p.add_argument("--cloud", choices=sorted(CLOUDS), help="only this cloud's templates (default: every cloud)")
    images_sub = p.add_subparsers(title="images commands", metavar="COMMAND")
    p = images_sub.add_parser(
        "revoke",
        help="exclude a gallery version from latest with an end of life; no build starts from it",
        parents=[connection],
    )
    p.set_defaults(handler=golden.images_revoke)
    p.add_argument("version", help="the gallery image version id")
    p.add_argument("--descendants", action="store_true", help="and every version built from it, at any depth")
    p.add_argument("--reason", help="why (shown by kiln images and in a refused build's message)")
    p.add_argument("--end-of-life", type=datetime.fromisoformat, help="ISO date (default: now)")
    p.add_argument("--cloud", choices=sorted(CLOUDS), default="local", help="the cloud holding it (default: local)")

    retention = sub.add_parser("retention", help="keep a template's newest N gallery versions, and those in use")
    retention_sub = retention.add_subparsers(title="retention commands", required=True, metavar="COMMAND")
    for name, handler, text in (
        ("run", golden.retention_run, "apply retention once (--dry-run: only list what would go)"),
        ("schedule", golden.retention_schedule, "apply retention on a cron schedule of its own"),
    ):
        p = retention_sub.add_parser(name, help=text, description=text, parents=[connection])
        p.set_defaults(handler=handler)
        p.add_argument("template", nargs="?", help="the template whose versions to judge")
        p.add_argument(
            "--image-definition",
            metavar="ID",
            help="judge a gallery image definition's versions instead, any template's",
        )
        p.add_argument(
            "--cloud", choices=sorted(CLOUDS), default="local", help="with --image-definition (default local)"
        )
        p.add_argument("--keep", type=positive, required=True, help="how many of the newest versions to keep")
        p.add_argument(
            "--action",
            choices=["delete", "end-of-life"],
            default="delete",
            help="what to do with the rest (default delete)",
        )
        p.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
        if name == "schedule":
            p.add_argument("--cron", required=True, metavar="EXPR", help="e.g. '0 4 * * *'")
            p.add_argument("--timezone", default="UTC")

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
