"""What each ``kiln`` command does. Each returns the process exit code; errors that end a command early are
raised (``UsageError``, ``ConnectError``) and reported by the CLI in one place."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from activities.clouds.registry import CLOUDS, cloud_of, task_queue
from activities.connection import connect
from cli.builds import (
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    EXIT_USAGE,
    WORKFLOW_TYPE,
    Build,
    TemplateFile,
    UsageError,
    check_name,
    exit_code,
    get_build,
    get_status,
    read_template,
    run_state_of,
    start_build,
)
from cli.logs import read_log, sibling_log
from cli.progress import CUSTOMIZATION_LOG, POLL_SECONDS, STATE_STYLES, VALIDATION_LOG, follow, summary
from workflows.models import BUILD_ID, CLEANUP_LEFT, CLOUD, RUN_STATE, SOURCE_IMAGE, TEMPLATE_NAME, RunState
from workflows.template import DeploymentContext, TemplateError, TemplateIssue, template_json_schema


@dataclass
class Io:
    """Where a command writes: results to ``out``, errors and notes to ``err``."""

    out: Console
    err: Console


def print_issues(console: Console, source: str, error: TemplateError) -> None:
    count = len(error.issues)
    # Soft-wrapped, as each issue: a long path stays one line to copy, whatever the terminal's width.
    console.print(Text(f"{source}: {count} problem{'s' if count != 1 else ''}", style="bold red"), soft_wrap=True)
    for issue in error.issues:
        where = Text.assemble((issue.path, "cyan"), ": ") if issue.path else Text()
        console.print(Text.assemble("  ", where, issue.message), soft_wrap=True)


def print_warnings(console: Console, warnings: list[TemplateIssue]) -> None:
    """What AIB accepts only with a warning, each at its path."""
    for warning in warnings:
        where = Text.assemble((warning.path, "cyan"), ": ") if warning.path else Text()
        console.print(Text.assemble(("  warning: ", "yellow"), where, warning.message), soft_wrap=True)


def template_of(args: argparse.Namespace) -> TemplateFile:
    """The template file named on the command line, judged for ``--cloud``, an ARM template deployed where the
    deployment options say."""
    deployment = DeploymentContext(
        subscription_id=args.subscription, resource_group=args.resource_group, location=args.location
    )
    return read_template(args.file, args.parameters, deployment=deployment, cloud=args.cloud)


async def validate(args: argparse.Namespace, io: Io) -> int:
    try:
        template = template_of(args)
    except TemplateError as err:
        print_issues(io.out, str(args.file), err)
        return EXIT_USAGE
    count = len(template.warnings)
    io.out.print(Text(f"OK: {template.name}" + (f" ({count} warning{'s' if count != 1 else ''})" if count else "")))
    print_warnings(io.out, template.warnings)
    return EXIT_SUCCEEDED


async def schema(args: argparse.Namespace, io: Io) -> int:
    # Plain print, not rich: the output is JSON for other tools and must not be wrapped or styled.
    print(json.dumps(template_json_schema(), indent=2))
    return EXIT_SUCCEEDED


async def build(args: argparse.Namespace, io: Io) -> int:
    try:
        template = template_of(args)
    except TemplateError as err:
        print_issues(io.err, str(args.file), err)
        return EXIT_USAGE
    print_warnings(io.err, template.warnings)
    name = args.name or template.name
    check_name(name)  # before connecting: bad input never needs a server to be reported
    client = await connect(address=args.address, namespace=args.namespace)
    await start_build(client, template, name=name, cloud=args.cloud)
    io.out.print(Text.assemble("Started build ", (name, "bold"), f" on task queue {task_queue(args.cloud)}"))
    if args.no_wait:
        io.out.print(Text(f"Watch it with `kiln watch {name}`, stop it with `kiln cancel {name}`."))
        return EXIT_SUCCEEDED
    return await watch_to_end(await get_build(client, name), io)


async def watch(args: argparse.Namespace, io: Io) -> int:
    client = await connect(address=args.address, namespace=args.namespace)
    return await watch_to_end(await get_build(client, args.name), io)


async def watch_to_end(build: Build, io: Io) -> int:
    name = build.handle.id
    status = await follow(
        build,
        io.out,
        footer=f"Ctrl-C stops watching; the build goes on (`kiln cancel {name}` cancels it)",
        interrupted=f"Stopped watching. Build {name} goes on: `kiln watch {name}` to look again, "
        f"`kiln cancel {name}` to cancel it.",
    )
    io.out.print(summary(status))
    return exit_code(status)


async def status(args: argparse.Namespace, io: Io) -> int:
    client = await connect(address=args.address, namespace=args.namespace)
    current, note = await get_status(await get_build(client, args.name))
    if args.json:
        print(current.model_dump_json(indent=2))
    else:
        io.out.print(summary(current, with_steps=True))
        if current.warnings:
            io.out.print(Text("Accepted with warnings:", style="yellow"))
            print_warnings(io.out, current.warnings)
    if note:
        io.err.print(Text(note, style="yellow"))
    return EXIT_SUCCEEDED


async def list_builds(args: argparse.Namespace, io: Io) -> int:
    query = f"WorkflowType = '{WORKFLOW_TYPE}'"
    if args.state:
        query += f" AND {RUN_STATE.name} = '{args.state}'"
        if args.state == RunState.RUNNING:
            # A terminated build never got to update its state attribute.
            query += " AND ExecutionStatus = 'Running'"
    client = await connect(address=args.address, namespace=args.namespace)
    rows = []
    async for execution in client.list_workflows(query, limit=args.limit):
        attributes = execution.typed_search_attributes
        state = run_state_of(execution)
        rows.append(
            [
                Text(execution.id, style="bold"),
                Text(state, style=STATE_STYLES.get(state, "")),
                Text(attributes.get(CLOUD) or ""),
                Text(attributes.get(TEMPLATE_NAME) or ""),
                Text(attributes.get(SOURCE_IMAGE) or ""),
                execution.start_time.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
                Text(attributes.get(CLEANUP_LEFT) or "", style="red"),
            ]
        )
    # The cleanup column only when a build has left something: the usual list keeps its width for the source.
    with_cleanup = any(row[-1].plain for row in rows)
    table = Table(
        "name", "state", "cloud", "template", "source", "started", *(["cleanup left"] if with_cleanup else [])
    )
    for row in rows:
        table.add_row(*(row if with_cleanup else row[:-1]))
    if table.row_count:
        io.out.print(table)
    else:
        io.out.print(f"no builds{f' in state {args.state}' if args.state else ''}")
    return EXIT_SUCCEEDED


async def cancel(args: argparse.Namespace, io: Io) -> int:
    client = await connect(address=args.address, namespace=args.namespace)
    build = await get_build(client, args.name)
    if not build.running:
        current, _ = await get_status(build)
        io.err.print(Text(f"build {args.name} has already finished ({current.run_state}); nothing to cancel"))
        return EXIT_USAGE
    await build.handle.cancel()
    io.out.print(Text(f"Cancel requested for {args.name}; waiting while it cleans up."))
    final = await follow(
        build,
        io.out,
        footer="Ctrl-C stops watching; the cleanup goes on",
        interrupted=f"Stopped watching. Build {args.name} is still cleaning up: `kiln watch {args.name}` to look again.",
    )
    io.out.print(summary(final))
    if final.run_state == RunState.CANCELED:
        return EXIT_SUCCEEDED
    io.err.print(Text(f"build {args.name} ended {final.run_state} before the cancel took effect"))
    return EXIT_USAGE


async def logs(args: argparse.Namespace, io: Io) -> int:
    client = await connect(address=args.address, namespace=args.namespace)
    build = await get_build(client, args.name)
    log_name = VALIDATION_LOG if args.validation else CUSTOMIZATION_LOG
    offset, found, shown_note = 0, False, ""
    while True:
        current, note = await get_status(build)
        if note and note != shown_note:
            io.err.print(Text(note, style="yellow"))
            shown_note = note
        if current.log_uri:
            try:
                data = await read_log(sibling_log(current.log_uri, log_name), offset)
                found = True
            except FileNotFoundError:
                data = b""
            sys.stdout.flush()  # text printed so far goes before these bytes
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            offset += len(data)
        if not args.follow or current.finished:
            break
        await asyncio.sleep(POLL_SECONDS)
        await build.refresh()
    if not found:
        io.err.print(Text(f"build {args.name} has no {log_name}" + ("" if current.finished else " yet")))
        return EXIT_USAGE
    return EXIT_SUCCEEDED


async def gallery_create(args: argparse.Namespace, io: Io) -> int:
    """Make a local gallery and image definition: SharedImage targets need them first, as on Azure."""
    from activities.clouds.base import PermanentError
    from activities.clouds.local.admin import LocalAdmin

    gallery_id = args.image_definition_id.split("/images/")[0]
    admin = LocalAdmin()
    try:
        await admin.create_gallery(gallery_id, location=args.location)
        await admin.create_image_definition(
            args.image_definition_id,
            os_type=args.os_type,
            hyper_v_generation=args.hyper_v_generation,
            publisher=args.publisher,
            offer=args.offer,
            sku=args.sku,
        )
    except PermanentError as err:
        raise UsageError(err.message) from None
    io.out.print(Text.assemble("Local gallery image definition ready: ", (args.image_definition_id, "bold")))
    return EXIT_SUCCEEDED


async def gallery_list(args: argparse.Namespace, io: Io) -> int:
    from activities.clouds.local.admin import LocalAdmin

    records = await LocalAdmin().list_gallery()
    table = Table("kind", "id", "version", "regions")
    for record in records:
        regions = record.data.get("regions") or {}
        table.add_row(record.kind, record.id, record.data.get("version", ""), ", ".join(regions))
    io.out.print(table if table.row_count else "no local galleries: make one with `kiln gallery create`")
    return EXIT_SUCCEEDED


async def resources(args: argparse.Namespace, io: Io) -> int:
    """What the local cloud has made, from its resource store; ``--orphans``: temporary resources of builds
    that are no longer running (a terminated build never ran its cleanup)."""
    from activities.clouds.local.admin import LocalAdmin

    active: set[str] = set()
    if args.orphans:
        client = await connect(address=args.address, namespace=args.namespace)
        query = f"WorkflowType = '{WORKFLOW_TYPE}' AND ExecutionStatus = 'Running'"
        async for execution in client.list_workflows(query):
            if build_id := execution.typed_search_attributes.get(BUILD_ID):
                active.add(build_id)
    records = await LocalAdmin().list_resources(args.orphans, active_builds=active)
    table = Table("kind", "id", "build", "role", "created")
    for record in records:
        table.add_row(
            record.kind,
            record.id,
            record.build_id or "",
            record.role,
            record.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        )
    what = "orphaned resources" if args.orphans else "local resources"
    io.out.print(table if table.row_count else f"no {what}")
    return EXIT_SUCCEEDED


async def bases(args: argparse.Namespace, io: Io) -> int:
    """The local cloud's Debian bases: each release's kept versions, which one ``latest`` pins to; ``--rebuild``
    makes a new version now (of one offer's release, or of every release already made)."""
    from activities.clouds.local.images import OFFERS, ImageCache
    from activities.clouds.state import state_dir

    cache = ImageCache(state_dir() / "images")
    releases = {offer.suite: [o for o in OFFERS if o.suite == offer.suite] for offer in OFFERS}
    if args.rebuild is not None:
        chosen = [o for o in OFFERS if args.rebuild in ("", o.offer)]
        if not chosen:
            known = ", ".join(dict.fromkeys(o.offer for o in OFFERS))
            raise UsageError(f"--rebuild: {args.rebuild!r} is not a local offer ({known})")
        for suite in dict.fromkeys(o.suite for o in chosen):
            offer = releases[suite][0]
            if args.rebuild == "" and not cache.versions(offer):
                continue  # a release no build has asked for yet is made when one does
            with io.err.status(f"making a new Debian {suite} base from the Debian registry (a few minutes)"):
                try:
                    made = await cache.rebuild(offer)
                except RuntimeError as err:
                    raise UsageError(str(err)) from None
            io.err.print(Text.assemble(f"Debian {suite}: made version ", (made.version, "bold")))
    table = Table("offer:sku", "version", "made", "latest")
    for offers in releases.values():
        latest = cache.fresh(offers[0])
        for version in reversed(cache.versions(offers[0])):
            base = cache.base(offers[0], version)
            note = "← latest" if base == latest else "" if cache.current_recipe(base) else "older recipe"
            made = cache.made_at(base).astimezone().strftime("%Y-%m-%d %H:%M")
            table.add_row(", ".join(f"{o.offer}:{o.sku}" for o in offers), version, made, note)
    io.out.print(table if table.row_count else "no local bases yet: the first build of a Debian source makes one")
    return EXIT_SUCCEEDED


async def export(args: argparse.Namespace, io: Io) -> int:
    """Convert an output of a finished local build into a disk file for another hypervisor."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from activities.clouds.base import PermanentError
    from activities.clouds.local.export import FORMATS, export_output
    from activities.clouds.local.records import ResourceStore
    from activities.clouds.local.storage import LocalStorage

    disk_format = args.format or args.file.suffix.lstrip(".").lower()
    if disk_format not in FORMATS:
        raise UsageError(f"--format: say which of {', '.join(FORMATS)} to write ({args.file.name} does not tell)")
    client = await connect(address=args.address, namespace=args.namespace)
    current, _ = await get_status(await get_build(client, args.name))
    if current.run_state not in (RunState.SUCCEEDED, RunState.PARTIALLY_SUCCEEDED):
        raise UsageError(f"build {args.name} is {current.run_state.value}: only a finished build has outputs")
    if cloud_of(current.cloud) in CLOUDS and cloud_of(current.cloud) != "local":
        raise UsageError(f"build {args.name} ran on {cloud_of(current.cloud)}: kiln export converts local outputs")
    outputs = {o.run_output_name: o for o in current.run_outputs if o.provisioning_state == "Succeeded"}
    have = ", ".join(outputs) or "none"
    if args.run_output is None and len(outputs) != 1:
        raise UsageError(f"--run-output: name one of the outputs of build {args.name} (it has: {have})")
    name = args.run_output or next(iter(outputs))
    if name not in outputs:
        raise UsageError(f"--run-output: build {args.name} has no finished output {name!r} (it has: {have})")
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), console=io.err) as progress:
        task = progress.add_task(f"{name} → {args.file} ({disk_format})", total=100)
        async with LocalStorage(store=ResourceStore()) as storage:
            try:
                await export_output(
                    storage,
                    outputs[name],
                    args.file,
                    disk_format,
                    on_progress=lambda percent: progress.update(task, completed=percent),
                )
            except PermanentError as err:
                raise UsageError(err.message) from None
        progress.update(task, completed=100)
    io.out.print(Text.assemble("Exported ", (name, "bold"), f" of {args.name} to ", (str(args.file), "bold")))
    return EXIT_SUCCEEDED


async def janitor(args: argparse.Namespace, io: Io) -> int:
    """Run the janitor once and show what it cleaned, or (``--every``) keep it running on a schedule."""
    from activities.janitor import schedule_janitor
    from workflows.janitor import JanitorWorkflow
    from workflows.models import JanitorRequest

    client = await connect(address=args.address, namespace=args.namespace)
    queue = task_queue(args.cloud)
    request = JanitorRequest(task_queue=queue)
    if args.every is None:
        report = await client.execute_workflow(
            JanitorWorkflow.run, request, id=f"kiln-janitor-{args.cloud}-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
        io.out.print(f"looked at {len(report.builds)} abandoned build(s) on {queue}")
        for line in report.cleaned:
            io.out.print(Text(f"  cleaned  {line}", style="green"))
        for line in report.swept:
            io.out.print(Text(f"  deleted  {line} (by its build-id tag)", style="green"))
        for line in report.failed:
            io.out.print(Text(f"  failed   {line}", style="red"))
        return EXIT_SUCCEEDED if not report.failed else EXIT_FAILED
    schedule_id = await schedule_janitor(client, cloud=args.cloud, task_queue=queue, every=args.every)
    io.out.print(f"schedule {schedule_id}: the janitor runs every {args.every} on {queue}")
    return EXIT_SUCCEEDED


async def deadline(args: argparse.Namespace, io: Io) -> int:
    """Move a running build's deadline: more time for a slow build without starting it over, or less."""
    from temporalio.client import WorkflowUpdateFailedError

    from workflows.build import ImageBuildWorkflow
    from workflows.models import DeadlineRequest

    client = await connect(address=args.address, namespace=args.namespace)
    build = await get_build(client, args.name)
    if not build.running:
        current, _ = await get_status(build)
        raise UsageError(f"build {args.name} has already finished ({current.run_state}); it has no deadline to move")
    try:
        status = await build.handle.execute_update(
            ImageBuildWorkflow.set_deadline, DeadlineRequest(seconds=args.duration.total_seconds())
        )
    except WorkflowUpdateFailedError as err:
        raise UsageError(f"build {args.name}: {err.cause.message if err.cause else err}") from None
    assert status.deadline is not None
    io.out.print(f"build {args.name} now times out at {status.deadline.astimezone():%Y-%m-%d %H:%M:%S}")
    return EXIT_SUCCEEDED


async def codec_server(args: argparse.Namespace, io: Io) -> int:
    """Serve Temporal's remote codec protocol with this machine's payload keys, until interrupted."""
    from activities.codec import CodecKeyError, EncryptionCodec, keys_from_environment
    from cli.codec_server import DEV_UI_ORIGINS, start_codec_server

    try:
        keys = keys_from_environment()
    except CodecKeyError as err:
        raise UsageError(str(err)) from None
    if not keys:
        raise UsageError("no payload keys: set KILN_CODEC_KEYS or KILN_CODEC_KEY_FILE (`kiln codec-key` makes one)")
    codec = EncryptionCodec(keys)
    origins = args.ui_origin or DEV_UI_ORIGINS
    try:
        runner = await start_codec_server(codec, host=args.host, port=args.port, origins=origins)
    except OSError as err:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    io.err.print(
        f"codec server on http://{args.host}:{args.port} (sealing with key {codec.key_id!r}, "
        f"{len(keys)} key(s)), for the Web UI at {', '.join(origins)}"
    )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return EXIT_SUCCEEDED


async def codec_key(args: argparse.Namespace, io: Io) -> int:
    """Print a new payload key entry, for KILN_CODEC_KEYS or a key file."""
    from activities.codec import new_key_entry

    io.out.print(new_key_entry(args.key_id), soft_wrap=True)
    return EXIT_SUCCEEDED
