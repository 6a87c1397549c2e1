"""One way to reach Temporal for every kiln process: the CLI, the worker and scripts.

Settings come from Temporal's own environment configuration (``temporalio.envconfig``), so the variables and
config file that the ``temporal`` CLI reads work here too: ``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``,
``TEMPORAL_API_KEY``, ``TEMPORAL_TLS_CLIENT_CERT_PATH``/``_KEY_PATH``, ``TEMPORAL_TLS_SERVER_CA_CERT_PATH``,
``TEMPORAL_PROFILE`` and ``TEMPORAL_CONFIG_FILE`` (TOML profiles). That is all a Temporal cluster or Temporal
Cloud needs; with nothing set, kiln talks to a dev server on ``localhost:7233``.

Payloads are sealed with the keys of ``activities.codec`` when they are configured (``KILN_CODEC_KEYS`` or
``KILN_CODEC_KEY_FILE``), and failures' messages and stack traces with them, so every client and worker of a
deployment must be given the same keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec
from temporalio.envconfig import ClientConfigProfile
from temporalio.runtime import Runtime

from activities.codec import CodecKeyError, codec_from_environment

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"


class ConnectError(RuntimeError):
    """Temporal could not be reached, or its client settings could not be read. The message says which."""


def data_converter(codec: PayloadCodec | None) -> DataConverter:
    """kiln's converter: pydantic models as JSON, sealed by ``codec`` (failures too) when there is one."""
    if codec is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect(
    *,
    address: str | None = None,
    namespace: str | None = None,
    codec: PayloadCodec | None = None,
    runtime: Runtime | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> Client:
    """Connect to Temporal with kiln's data converter.

    Args:
        address: ``host:port``; overrides ``TEMPORAL_ADDRESS`` and the config file.
        namespace: overrides ``TEMPORAL_NAMESPACE`` and the config file.
        codec: the payload codec; by default the one the environment's keys make (none without keys).
        runtime: the SDK runtime (its telemetry: Prometheus metrics); by default the SDK's own.
        interceptors: client interceptors, which the client's workers take too (tracing).

    Raises:
        ConnectError: the settings are unreadable (a bad config file, a missing TLS file) or the server did not
            answer; the message names the address and how to start a local server.
    """
    try:
        codec = codec or codec_from_environment()
    except CodecKeyError as err:
        raise ConnectError(f"cannot read the payload keys: {err}") from err
    try:
        config = ClientConfigProfile.load().to_client_connect_config()
    except (RuntimeError, OSError, ValueError) as err:  # the bridge's ConfigError is a RuntimeError
        raise ConnectError(f"cannot read the Temporal client configuration: {err}") from err
    if address:
        config["target_host"] = address
    if namespace:
        config["namespace"] = namespace
    config.setdefault("target_host", DEFAULT_ADDRESS)
    config.setdefault("namespace", DEFAULT_NAMESPACE)
    try:
        # Workflow inputs and results are pydantic models; every client of a build must use this converter.
        return await Client.connect(
            **config, data_converter=data_converter(codec), runtime=runtime, interceptors=interceptors
        )
    except RuntimeError as err:
        raise ConnectError(
            f"cannot connect to Temporal at {config['target_host']} (namespace {config['namespace']}): {err}\n"
            "Start a local one with `python worker.py --dev`, or point TEMPORAL_ADDRESS (or --address) at your cluster."
        ) from err
