"""What a worker tells its operators: Prometheus metrics (the SDK's and kiln's own, ``workflows.metrics``),
OpenTelemetry traces of each build across its workflow and activities, and logs, as text or as JSON lines that
carry the build's id.

* Metrics: ``Runtime`` telemetry serves ``/metrics`` on the given address; durations in seconds.
* Traces: the SDK's ``TracingInterceptor``, exported over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``--otlp-endpoint``), with the OpenTelemetry SDK's own variables for everything else (headers, service name).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from workflows.metrics import BOOT_CHECK_DURATION, BUCKETS, CLEANUP_RETRIES

SERVICE_NAME = "kiln-worker"


def metrics_runtime(bind_address: str) -> Runtime:
    """An SDK runtime that serves Prometheus metrics on ``bind_address`` (``0.0.0.0:9464``)."""
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=bind_address, durations_as_seconds=True, histogram_bucket_overrides=BUCKETS
            )
        )
    )


def tracing_interceptor(endpoint: str | None, *, exporter: Any | None = None) -> Interceptor:
    """The SDK's tracing interceptor on a tracer of kiln's own: spans go over OTLP/HTTP to ``endpoint`` (its
    ``/v1/traces``), or to ``exporter`` (a test's in-memory one)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from temporalio.contrib.opentelemetry import TracingInterceptor

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")))
    return TracingInterceptor(provider.get_tracer("kiln"))


class _CountCleanupRetries(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, undos: frozenset[str]) -> None:
        super().__init__(next)
        self._undos = undos

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        if info.attempt > 1 and info.activity_type in self._undos:
            activity.metric_meter().create_counter(CLEANUP_RETRIES, "undo attempts after the first").add(
                1, {"undo": info.activity_type}
            )
        return await self.next.execute_activity(input)


class CleanupRetries(Interceptor):
    """Counts each retry of an undo activity (``kiln_cleanup_retries``)."""

    def __init__(self, undos: frozenset[str]) -> None:
        self._undos = undos

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _CountCleanupRetries(next, self._undos)


def record_boot_check(took: timedelta, *, accelerator: str) -> None:
    """A boot check's time from power-on to SSH, when an activity ran it."""
    if activity.in_activity():
        activity.metric_meter().create_histogram_timedelta(
            BOOT_CHECK_DURATION, "boot checks from power-on to SSH", "duration"
        ).record(took, {"accelerator": accelerator})


def build_id_of_record(record: logging.LogRecord) -> str | None:
    """The build (workflow id) a log line belongs to: the SDK's loggers name it, and any line written while an
    activity runs (kiln's, the Azure SDK's, asyncssh's) is that activity's build."""
    for extra in ("temporal_workflow", "temporal_activity"):
        details = getattr(record, extra, None)
        if isinstance(details, dict) and details.get("workflow_id"):
            return details["workflow_id"]
    if activity.in_activity():
        return activity.info().workflow_id
    if workflow.in_workflow():
        return workflow.info().workflow_id
    return None


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the build's id, and the activity or step it ran."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "build_id": build_id_of_record(record),
        }
        if isinstance(details := getattr(record, "temporal_activity", None), dict):
            line["activity"] = details.get("activity_type")
            line["attempt"] = details.get("attempt")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(log_format: str) -> None:
    """``text`` (the default) or ``json``: every line of the process, to standard error."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLines())
        # The build and step are fields of each line: not appended to the message as well.
        workflow.logger.workflow_info_on_message = False
        activity.logger.activity_info_on_message = False
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for chatty in ("azure", "asyncssh"):  # every HTTP request and SSH channel otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
