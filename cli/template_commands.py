"""``kiln template``, ``kiln schedule``, ``kiln trigger`` and ``kiln images``: templates as AIB keeps them, run
many times, on schedules and on new source versions. Each handler returns the exit code; refusals are raised as
``UsageError`` and reported by the CLI in one place."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from datetime import UTC, datetime

from rich.table import Column, Table
from rich.text import Text
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleBackfill,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    WorkflowExecutionStatus,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.clouds.registry import task_queue
from activities.connection import connect
from activities.images import read_lineage, read_templates
from cli.builds import EXIT_SUCCEEDED, UsageError, get_build
from cli.commands import Io, print_issues, print_warnings, template_of, watch_to_end
from cli.progress import STATE_STYLES
from cli.templates import create_template, default_condition, get_template, schedule_of, update
from workflows.golden_models import (
    RetentionRequest,
    RetireRequest,
    RevokeRequest,
    RunRecord,
    RunRequest,
    SourceTrigger,
    TemplateRevision,
    TemplateState,
    TriggerRequest,
    UpdateTemplateRequest,
    Webhook,
)
from workflows.images import RetentionWorkflow, RevokeImagesWorkflow
from workflows.retention import descendants
from workflows.template import TemplateError

SKIP_STYLE = "dim"


def when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, SKIP_STYLE))  # type: ignore[call-overload]


def webhooks_of(args: argparse.Namespace) -> list[Webhook] | None:
    if not args.webhook:
        return None
    return [Webhook(url=url, format=args.webhook_format) for url in args.webhook]


def checked_template(args: argparse.Namespace, io: Io) -> dict | None:
    """The template file validated as ``kiln build`` validates it; None (after printing why) if refused."""
    try:
        template = template_of(args)
    except TemplateError as err:
        print_issues(io.err, str(args.file), err)
        return None
    print_warnings(io.err, template.warnings)
    return template.raw


async def client_of(args: argparse.Namespace) -> Client:
    return await connect(address=args.address, namespace=args.namespace)


# -- kiln template -----------------------------------------------------------------------------------------------


async def template_create(args: argparse.Namespace, io: Io) -> int:
    raw = checked_template(args, io)
    if raw is None:
        return 2
    client = await client_of(args)
    await create_template(
        client, args.name, raw, cloud=args.cloud, task_queue=task_queue(args.cloud), webhooks=webhooks_of(args)
    )
    auto = (raw.get("properties", {}).get("autoRun") or {}).get("state") == "Enabled"
    io.out.print(
        Text.assemble(
            "Created template ",
            (args.name, "bold"),
            " (autoRun Enabled: its first build starts now)"
            if auto
            else f"; build it with `kiln template run {args.name}`",
        )
    )
    return EXIT_SUCCEEDED


async def template_update(args: argparse.Namespace, io: Io) -> int:
    raw = checked_template(args, io)
    if raw is None:
        return 2
    handle, _ = await get_template(await client_of(args), args.name)
    revision = await update(
        handle,
        "update_template",
        UpdateTemplateRequest(template=raw, webhooks=webhooks_of(args)),
        result_type=TemplateRevision,
    )
    io.out.print(f"template {args.name} is now at revision {revision.revision}; its next run builds it")
    return EXIT_SUCCEEDED


async def template_run(args: argparse.Namespace, io: Io) -> int:
    client = await client_of(args)
    handle, _ = await get_template(client, args.name)
    record = await update(handle, "run_template", RunRequest(), result_type=RunRecord)
    io.out.print(Text.assemble("Started build ", (record.build, "bold"), f" of template {args.name}"))
    if args.no_wait:
        return EXIT_SUCCEEDED
    code = await watch_to_end(await get_build(client, record.build), io)
    if not await recorded(client, args.name, record.build):
        io.err.print(Text(f"Template {args.name} has not recorded the end of {record.build} yet", style="yellow"))
    return code


async def recorded(client: Client, name: str, build: str, within: float = 30) -> bool:
    """Whether the template holds the build's end within ``within`` seconds. It learns of the end after the build
    ends: waiting for it, a `kiln template show` right after `kiln template run` shows the run's lastRunStatus."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not next(r for r in (await get_template(client, name))[1].runs if r.build == build).finished:
                await asyncio.sleep(0.2)
            return True
    return False


async def template_cancel(args: argparse.Namespace, io: Io) -> int:
    handle, _ = await get_template(await client_of(args), args.name)
    record = await update(handle, "cancel_run", result_type=RunRecord)
    io.out.print(f"Cancel requested for build {record.build}; `kiln watch {record.build}` shows its cleanup")
    return EXIT_SUCCEEDED


async def template_delete(args: argparse.Namespace, io: Io) -> int:
    handle, _ = await get_template(await client_of(args), args.name)
    await update(handle, "delete", result_type=TemplateState)
    io.out.print(f"Deleted template {args.name}; its builds and their outputs stay")
    return EXIT_SUCCEEDED


def runs_table(state: TemplateState, limit: int) -> Table:
    # The build's name whole, whatever the message beside it: it is what `kiln status` and `kiln logs` take.
    table = Table(
        "run", "reason", Column("build", no_wrap=True), "rev", "state", "source version", "started", "message"
    )
    for record in state.runs[-limit:]:
        table.add_row(
            str(record.number),
            record.reason + (f" ({record.requested_by})" if record.requested_by else ""),
            record.build,
            str(record.revision),
            state_text(record.run_state),
            record.source_exact_version,
            when(record.start_time),
            record.message.split("\n", 1)[0],
        )
    return table


def trigger_text(trigger: SourceTrigger) -> Text:
    return Text.assemble(
        (f"trigger {trigger.name}", "bold"),
        f" ({trigger.kind}, every {trigger.interval_seconds:g}s, ",
        "enabled" if trigger.enabled else "disabled",
        f", {trigger.consecutive_failures}/{trigger.failure_limit} failures): ",
        (trigger.status.code, "green" if trigger.status.code == "Healthy" else "red"),
        f" {trigger.status.message} ({when(trigger.status.time)})",
    )


async def template_show(args: argparse.Namespace, io: Io) -> int:
    _, state = await get_template(await client_of(args), args.name)
    if args.json:
        print(state.model_dump_json(indent=2))
        return EXIT_SUCCEEDED
    last = state.last_run_status
    io.out.print(
        Text.assemble(
            (state.name, "bold"),
            f"  cloud {state.cloud}, revision {state.current.revision}, {len(state.runs)} run(s), lastRunStatus ",
            state_text(last.run_state) if last else Text("none"),
        )
    )
    if state.trigger:
        io.out.print(trigger_text(state.trigger))
    for webhook in state.webhooks:
        io.out.print(f"webhook ({webhook.format}): {webhook.url}")
    if state.runs:
        io.out.print(runs_table(state, args.limit))
    return EXIT_SUCCEEDED


async def template_list(args: argparse.Namespace, io: Io) -> int:
    client = await client_of(args)
    table = Table("template", "cloud", "revision", "runs", "lastRunStatus", "trigger")
    states, silent = await read_templates(client)
    for state in states:
        last = state.last_run_status
        trigger = state.trigger
        table.add_row(
            Text(state.name, style="bold"),
            state.cloud,
            str(state.current.revision),
            str(len(state.runs)),
            state_text(last.run_state) if last else Text(""),
            (trigger.status.code if trigger.enabled else "disabled") if trigger else "",
        )
    for queue in sorted(silent):
        io.err.print(Text(f"templates on task queue {queue} are not shown: no worker answered for it", style="yellow"))
    io.out.print(table if table.row_count else "no templates: make one with `kiln template create NAME FILE`")
    return EXIT_SUCCEEDED


# -- kiln trigger --------------------------------------------------------------------------------------------


async def trigger_create(args: argparse.Namespace, io: Io) -> int:
    handle, _ = await get_template(await client_of(args), args.template)
    request = TriggerRequest(
        name=args.name, interval_seconds=args.interval.total_seconds(), failure_limit=args.failure_limit
    )
    trigger = await update(handle, "create_trigger", request, result_type=SourceTrigger)
    io.out.print(trigger_text(trigger))
    return EXIT_SUCCEEDED


async def trigger_show(args: argparse.Namespace, io: Io) -> int:
    _, state = await get_template(await client_of(args), args.template)
    if state.trigger is None:
        raise UsageError(f"template {args.template} has no trigger: add one with `kiln trigger create {args.template}`")
    io.out.print(trigger_text(state.trigger))
    return EXIT_SUCCEEDED


async def trigger_delete(args: argparse.Namespace, io: Io) -> int:
    handle, _ = await get_template(await client_of(args), args.template)
    await update(handle, "delete_trigger")
    io.out.print(f"Deleted the trigger of template {args.template}")
    return EXIT_SUCCEEDED


# -- kiln schedule ------------------------------------------------------------------------------------------


async def schedule_create(args: argparse.Namespace, io: Io) -> int:
    client = await client_of(args)
    _, state = await get_template(client, args.template)
    condition = args.when or default_condition(state.current.template)
    schedule = schedule_of(
        name=args.name,
        template=args.template,
        task_queue=task_queue(state.cloud),
        cron=args.cron,
        when=condition,
        timezone=args.timezone,
        jitter=args.jitter,
        catchup_window=args.catchup_window,
    )
    try:
        await client.create_schedule(args.name, schedule)
    except ScheduleAlreadyRunningError:
        raise UsageError(f"schedule {args.name} exists: delete it first, or pick another name") from None
    except RPCError as err:
        if err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise UsageError(f"--cron {args.cron!r} / --timezone {args.timezone!r}: {err.message}") from None
        raise
    io.out.print(
        f"schedule {args.name}: runs template {args.template} on '{args.cron}' ({args.timezone}), when {condition}"
    )
    return EXIT_SUCCEEDED


async def schedule_handle(args: argparse.Namespace) -> tuple[Client, ScheduleHandle, ScheduleDescription]:
    client = await client_of(args)
    handle = client.get_schedule_handle(args.name)
    try:
        description = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise UsageError(f"no schedule named {args.name}") from None
        raise
    return client, handle, description


async def schedule_list(args: argparse.Namespace, io: Io) -> int:
    client = await client_of(args)
    table = Table("schedule", "paused", "next run", "note")
    async for listed in await client.list_schedules():
        if not listed.id.startswith("kiln-janitor") and listed.info is not None:
            nxt = listed.info.next_action_times[0] if listed.info.next_action_times else None
            table.add_row(
                Text(listed.id, style="bold"),
                "yes" if listed.info.paused else "",
                when(nxt),
                listed.info.note or "",
            )
    io.out.print(table if table.row_count else "no schedules: make one with `kiln schedule create`")
    return EXIT_SUCCEEDED


async def schedule_describe(args: argparse.Namespace, io: Io) -> int:
    client, _, description = await schedule_handle(args)
    schedule, info = description.schedule, description.info
    io.out.print(
        Text.assemble(
            (args.name, "bold"),
            f"  {', '.join(schedule.spec.cron_expressions)} ({schedule.spec.time_zone_name or 'UTC'})",
            "  paused" if schedule.state.paused else "",
            f"  {schedule.state.note or ''}",
        )
    )
    io.out.print("next runs: " + ", ".join(when(t) for t in info.next_action_times[:5]))
    table = Table("scheduled for", "run", "build", "state", "message")
    for action in info.recent_actions:
        started = action.action
        if not isinstance(started, ScheduleActionExecutionStartWorkflow):
            continue
        run = client.get_workflow_handle(
            started.workflow_id, run_id=started.first_execution_run_id, result_type=RunRecord
        )
        execution = await run.describe()
        record = None
        if execution.status == WorkflowExecutionStatus.COMPLETED:
            record = await run.result()
        state = record.run_state if record else (execution.status.name.title() if execution.status else "")
        table.add_row(
            when(action.scheduled_at),
            started.workflow_id,
            record.build if record else "",
            state_text(state),
            (record.message.split("\n", 1)[0] if record else ""),
        )
    io.out.print(table if table.row_count else "no runs yet")
    return EXIT_SUCCEEDED


async def schedule_pause(args: argparse.Namespace, io: Io) -> int:
    _, handle, _ = await schedule_handle(args)
    await handle.pause(note=args.note or "paused with kiln schedule pause")
    io.out.print(f"schedule {args.name} paused")
    return EXIT_SUCCEEDED


async def schedule_unpause(args: argparse.Namespace, io: Io) -> int:
    _, handle, _ = await schedule_handle(args)
    await handle.unpause(note="unpaused with kiln schedule unpause")
    io.out.print(f"schedule {args.name} unpaused")
    return EXIT_SUCCEEDED


async def schedule_trigger(args: argparse.Namespace, io: Io) -> int:
    _, handle, _ = await schedule_handle(args)
    await handle.trigger(overlap=ScheduleOverlapPolicy.SKIP)
    io.out.print(f"schedule {args.name} runs now (skipped if its last run still builds)")
    return EXIT_SUCCEEDED


async def schedule_backfill(args: argparse.Namespace, io: Io) -> int:
    _, handle, _ = await schedule_handle(args)
    start, end = args.start.replace(tzinfo=args.start.tzinfo or UTC), args.end.replace(tzinfo=args.end.tzinfo or UTC)
    if end <= start:
        raise UsageError("--end must be after --start")
    # One after another: a run that would overlap the last waits for it instead of being dropped.
    await handle.backfill(ScheduleBackfill(start_at=start, end_at=end, overlap=ScheduleOverlapPolicy.BUFFER_ALL))
    io.out.print(f"schedule {args.name}: the runs due between {when(start)} and {when(end)} run now, one at a time")
    return EXIT_SUCCEEDED


async def schedule_delete(args: argparse.Namespace, io: Io) -> int:
    _, handle, _ = await schedule_handle(args)
    await handle.delete()
    io.out.print(f"schedule {args.name} deleted (a run under way finishes)")
    return EXIT_SUCCEEDED


# -- kiln images, kiln retention -------------------------------------------------------------------------------


async def images_list(args: argparse.Namespace, io: Io) -> int:
    lineage = await read_lineage(await client_of(args), task_queue=task_queue(args.cloud) if args.cloud else None)
    # One block a version: ids are too long for a table's column.
    shown = 0
    for template in lineage:
        if args.template and template.name != args.template:
            continue
        for output in sorted(template.outputs, key=lambda o: o.run, reverse=True):
            shown += 1
            retired = output.retired
            headline = Text.assemble((output.version_id, "bold"), f"  ({output.type} {output.run_output_name})")
            if retired:
                note = f" ({retired.note})" if retired.note else ""
                style = "red" if retired.action == "revoked" else "yellow"
                headline.append(f"  {retired.action}{note}, end of life {when(retired.end_of_life)}", style=style)
            io.out.print(headline, soft_wrap=True)
            io.out.print(
                f"  template {output.template} revision {output.revision}, build {output.build}, made {when(output.made)}",
                soft_wrap=True,
            )
            io.out.print(f"  source {output.source_image_id} ({output.source_exact_version})", soft_wrap=True)
            for artifact in output.artifacts:
                io.out.print(f"  file {artifact.source_uri} sha256 {artifact.sha256}", soft_wrap=True)
    if not shown:
        io.out.print("no output versions yet")
    return EXIT_SUCCEEDED


async def images_revoke(args: argparse.Namespace, io: Io) -> int:
    client = await client_of(args)
    lineage = await read_lineage(client, task_queue=task_queue(args.cloud))
    owners = {o.version_id.lower(): (t.name, t.cloud) for t in lineage for o in t.outputs}
    chosen = [args.version, *(descendants(lineage, args.version) if args.descendants else [])]
    if "/versions/" not in args.version.lower():
        raise UsageError(
            f"{args.version!r} is not a gallery image version id (.../images/<definition>/versions/<x.y.z>)"
        )
    end_of_life = args.end_of_life or datetime.now(UTC)
    note = args.reason or f"revoked {datetime.now(UTC):%Y-%m-%d}"
    request = RevokeRequest(
        versions=[
            RetireRequest(
                version_id=version,
                action="revoked",
                end_of_life=end_of_life,
                note=note if version == args.version else f"{note} (built from {args.version})",
                template=owners.get(version.lower(), ("", args.cloud))[0],
            )
            for version in chosen
        ]
    )
    revoked = await client.execute_workflow(
        RevokeImagesWorkflow.run,
        request,
        id=f"kiln-revoke-{uuid.uuid4().hex[:8]}",
        task_queue=task_queue(args.cloud),
    )
    for version in revoked:
        io.out.print(Text.assemble("revoked ", (version, "bold"), f" (end of life {when(end_of_life)})"))
    return EXIT_SUCCEEDED


async def retention_of(args: argparse.Namespace) -> tuple[Client, RetentionRequest, str, str]:
    """The request, the queue of the cloud it applies to, and a name for its runs."""
    if bool(args.template) == bool(args.image_definition):
        raise UsageError("name a TEMPLATE or give --image-definition, not both")
    client = await client_of(args)
    request = RetentionRequest(
        template=args.template or "",
        image_definition=args.image_definition or "",
        keep=args.keep,
        action=args.action,
        dry_run=args.dry_run,
    )
    if args.template:
        _, state = await get_template(client, args.template)
        return client, request, task_queue(state.cloud), args.template
    return client, request, task_queue(args.cloud), args.image_definition.rstrip("/").rsplit("/", 1)[-1]


async def retention_run(args: argparse.Namespace, io: Io) -> int:
    client, request, queue, label = await retention_of(args)
    report = await client.execute_workflow(
        RetentionWorkflow.run, request, id=f"kiln-retention-{label}-{uuid.uuid4().hex[:6]}", task_queue=queue
    )
    verb = "would go" if report.dry_run else ("deleted" if args.action == "delete" else "end of life now")
    for label, versions, style in (
        ("kept", report.kept, "green"),
        ("in use", report.in_use, "yellow"),
        (verb, report.retired, "red"),
    ):
        for version in versions:
            io.out.print(Text.assemble((f"{label:>16}  ", style), version))
    return EXIT_SUCCEEDED


async def retention_schedule(args: argparse.Namespace, io: Io) -> int:
    client, request, queue, label = await retention_of(args)
    schedule_id = f"kiln-retention-{label}"
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(RetentionWorkflow.run, request, id=schedule_id, task_queue=queue),
        spec=ScheduleSpec(cron_expressions=[args.cron], time_zone_name=args.timezone),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        state=ScheduleState(note=f"retention of {label}: keep newest {args.keep}"),
    )
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(schedule_id).update(lambda _: ScheduleUpdate(schedule=schedule))
    io.out.print(f"schedule {schedule_id}: keeps the newest {args.keep} of {label} on '{args.cron}'")
    return EXIT_SUCCEEDED
