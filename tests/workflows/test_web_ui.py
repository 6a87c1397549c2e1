"""A build started and found through the Temporal Web UI's own HTTP API, with the request its Start Workflow form
sends: the template pasted as the input, one json/plain payload."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.cookiejar import CookieJar
from typing import Any

from temporalio.client import Client

from tests.workflows.harness import Harness
from workflows.models import RunState


class WebUi:
    """A browser's view of the UI: its cookies, and the CSRF header the UI server asks of every POST."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.cookies = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        csrf = next((c.value for c in self.cookies if c.name == "_csrf"), None)
        if csrf:
            headers["X-CSRF-TOKEN"] = csrf
        request = urllib.request.Request(
            self.address + path,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
            method="GET" if body is None else "POST",
        )
        with self.opener.open(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    async def ready(self) -> None:
        """Load what the UI loads first (its settings set the CSRF cookie), then wait for the namespace list: the
        UI server dials the Temporal server once it is asked to, and answers 503 until that connection is up."""
        await self.get("/api/v1/settings")
        async with asyncio.timeout(60):
            while True:
                try:
                    await self.get("/api/v1/namespaces")
                    return
                except urllib.error.HTTPError as error:
                    if error.code != 503:
                        raise
                await asyncio.sleep(0.5)

    async def get(self, path: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._request, path)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self._request, path, body)


def json_payload(value: Any) -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {"metadata": {"encoding": b64("json/plain")}, "data": b64(json.dumps(value))}


async def test_a_build_started_from_the_web_ui_form_runs_and_is_listed_by_template(
    harness: Harness, client: Client, web_ui: str
) -> None:
    ui = WebUi(web_ui)
    await ui.ready()
    name = f"ui-{uuid.uuid4().hex[:8]}"

    started = await ui.post(
        f"/api/v1/namespaces/default/workflows/{name}",
        {
            "workflowId": name,
            "taskQueue": {"name": harness.task_queue},
            "workflowType": {"name": "ImageBuild"},
            "input": {"payloads": [json_payload(harness.template())]},
        },
    )
    assert started.get("runId"), started

    status = await harness.finish(client.get_workflow_handle(name))
    assert status.run_state == RunState.SUCCEEDED, status.message
    assert len(status.run_outputs) == 3
    assert harness.cloud.alive() == []

    # The UI's workflow list, filtered by kiln's search attributes as a user would type it in the UI.
    query = urllib.parse.quote(f'KilnTemplate = "{name}" AND KilnRunState = "Succeeded"')
    async with asyncio.timeout(30):  # visibility lags the close by a moment
        while not (listed := await ui.get(f"/api/v1/namespaces/default/workflows?query={query}")).get("executions"):
            await asyncio.sleep(0.5)
    assert [e["execution"]["workflowId"] for e in listed["executions"]] == [name]
