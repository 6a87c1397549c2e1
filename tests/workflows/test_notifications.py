"""Webhooks: each event reaches a loopback receiver once, with the template, build, runState, outputs and log
link; a receiver that fails is retried with backoff and never holds up a build; and a worker killed just after a
build ended, or while a delivery waits on its receiver, costs no event and repeats none."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp import web
from temporalio.client import Client, WorkflowExecutionStatus

from tests.services import free_port
from tests.workflows.harness import Harness, unserved
from tests.workflows.test_faults import worker_process
from tests.workflows.test_image_template import new_template, run_ended, state_of
from workflows.golden_models import RunRequest, Webhook
from workflows.image_template import ImageTemplateWorkflow
from workflows.policies import NOTIFY_ATTEMPT_TIMEOUT


class Receiver:
    """A webhook on loopback that keeps every request it gets, and fails the first ``failures`` with a 503."""

    def __init__(self) -> None:
        # (the webhook's query string, the event id header, the body) of every request answered 2xx
        self.posts: list[tuple[str, str, dict[str, Any]]] = []
        self.failures = 0
        self.holds = 0  # the first ``holds`` requests get no answer while their sender lives
        self.holding = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.holds > 0:
            self.holds -= 1
            self.holding.set()
            await asyncio.sleep(NOTIFY_ATTEMPT_TIMEOUT.total_seconds() + 10)  # past the delivery's attempt
            return web.Response(status=503, text="held")
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=503, text="busy")
        self.posts.append((request.query_string, request.headers["X-Kiln-Event-Id"], body))
        return web.Response(status=204)

    async def wait_for(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.posts) < count:
                await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # a repeat, if there were one, would come now
        return [body for _, _, body in self.posts]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    receiver.url = f"http://127.0.0.1:{port}/hook"
    yield receiver
    await runner.cleanup()


async def test_a_build_s_end_is_posted_once_with_what_a_receiver_needs(harness: Harness, receiver: Receiver) -> None:
    receiver.failures = 2  # retried with backoff, and the build does not wait for it
    entity = await new_template(harness, webhooks=[Webhook(url=receiver.url)])
    await entity.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
    ended = await run_ended(entity, 1)
    assert ended.run_state == "Succeeded"

    [event] = await receiver.wait_for(1)

    assert event["kind"] == "build.succeeded"
    assert event["template"] == (await state_of(entity)).name
    assert event["build"] == ended.build and event["runState"] == "Succeeded"
    assert {o["runOutputName"] for o in event["outputs"]} == {"managed", "gallery", "vhd"}
    assert event["logUri"].endswith("customization.log")
    assert receiver.posts[0][1] == event["id"]


async def test_a_failed_build_and_a_slack_receiver(harness: Harness, receiver: Receiver) -> None:
    harness.cloud.inject("customize", "fatal")
    entity = await new_template(harness, webhooks=[Webhook(url=receiver.url, format="slack")])
    await entity.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
    ended = await run_ended(entity, 1)

    [body] = await receiver.wait_for(1)

    assert ended.run_state == "Failed"
    assert body["text"].startswith(f"kiln build.failed: {body['kiln']['template']} {ended.build} (Failed)")
    assert "customization.log" in body["text"]


async def test_each_event_arrives_once_when_the_worker_dies_right_after_the_build(
    client: Client, tmp_path: Path, receiver: Receiver
) -> None:
    harness = unserved(client, tmp_path)
    log = tmp_path / "worker.log"
    async with worker_process(harness, log) as first:
        entity = await new_template(
            harness, webhooks=[Webhook(url=f"{receiver.url}?to=a"), Webhook(url=f"{receiver.url}?to=b")]
        )
        record = await entity.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
        build = client.get_workflow_handle(record.build)
        async with asyncio.timeout(60):
            while (await build.describe()).status == WorkflowExecutionStatus.RUNNING:
                await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        await first.wait()
    async with worker_process(harness, log):
        bodies = await receiver.wait_for(2, timeout=120)
        assert (await run_ended(entity, 1)).run_state == "Succeeded"
    assert sorted(to for to, _, _ in receiver.posts) == ["to=a", "to=b"]  # once to each webhook
    assert [b["kind"] for b in bodies] == ["build.succeeded"] * 2
    assert len({b["id"] for b in bodies}) == 1  # the same event


async def test_an_event_whose_delivery_died_with_its_worker_arrives_from_the_next_worker(
    client: Client, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.holds = 1
    harness = unserved(client, tmp_path)
    log = tmp_path / "worker.log"
    async with worker_process(harness, log) as first:
        entity = await new_template(harness, webhooks=[Webhook(url=receiver.url)])
        await entity.execute_update(ImageTemplateWorkflow.run_template, RunRequest())
        async with asyncio.timeout(120):
            await receiver.holding.wait()  # the delivery is in flight on this worker
        first.send_signal(signal.SIGKILL)
        await first.wait()
    async with worker_process(harness, log):
        [event] = await receiver.wait_for(1, timeout=120)  # its attempt timed out and ran again here
    assert event["kind"] == "build.succeeded" and event["runState"] == "Succeeded"
