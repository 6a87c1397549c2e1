"""Webhook deliveries: one event to one webhook, as JSON, or as a Slack or Teams message.

Each delivery is an activity the entity starts and does not wait on, retried with backoff by its retry policy;
the event's id rides on every attempt (body and ``X-Kiln-Event-Id``), so a receiver can drop the rare repeat of
an attempt whose answer was lost.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from temporalio import activity

from activities.clouds.base import PermanentError
from workflows.golden_models import Delivery, NotificationEvent
from workflows.policies import NOTIFY_ATTEMPT_TIMEOUT

# The POST gives up before its attempt does, so a receiver's silence is reported as such, not as a timeout.
TIMEOUT = aiohttp.ClientTimeout(total=NOTIFY_ATTEMPT_TIMEOUT.total_seconds() - 10)


def summary(event: NotificationEvent) -> str:
    """One line a person reads: what happened to which template and build."""
    subject = f"{event.template} {event.build}".strip()
    text = f"kiln {event.kind}: {subject}"
    if event.run_state:
        text += f" ({event.run_state})"
    if event.message:
        text += f": {event.message}"
    if event.log_uri:
        text += f" log: {event.log_uri}"
    return text


def body(event: NotificationEvent, format: str) -> dict[str, Any]:
    """The request body in the webhook's format; every format carries the whole event."""
    data = event.model_dump(mode="json")
    if format == "slack":
        return {"text": summary(event), "kiln": data}
    if format == "teams":
        facts = [{"title": k, "value": str(v)} for k, v in data.items() if v and k not in ("outputs",)]
        return {
            "@type": "MessageCard",
            "@context": "https://schema.org/extensions",
            "summary": summary(event),
            "title": f"kiln {event.kind}",
            "sections": [{"activityTitle": summary(event), "facts": facts}],
            "kiln": data,
        }
    return data


@activity.defn
async def deliver(delivery: Delivery) -> None:
    """POST the event. A 4xx other than 408/429 is permanent (the webhook refuses it); all else is retried."""
    event, webhook = delivery.event, delivery.webhook
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(
            webhook.url, json=body(event, webhook.format), headers={"X-Kiln-Event-Id": event.id}
        ) as response:
            if response.status < 300:
                return
            text = (await response.text())[:200]
            if 400 <= response.status < 500 and response.status not in (408, 429):
                raise PermanentError(
                    f"webhook {webhook.url} refused event {event.id}: HTTP {response.status} {text}",
                    kind="WebhookRefused",
                )
            raise RuntimeError(f"webhook {webhook.url} answered HTTP {response.status} {text}")
