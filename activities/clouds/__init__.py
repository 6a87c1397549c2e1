"""The ``Cloud`` protocol and its implementations (``local``, ``azure``)."""

from activities.clouds.base import Cloud, LogSink, PermanentError

__all__ = ["Cloud", "LogSink", "PermanentError"]
