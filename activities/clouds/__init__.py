"""The ``Cloud`` protocol and its implementations (``local``, ``azure``)."""

from activities.clouds.base import Cloud, GuestSession, LogSink, PermanentError, ScriptProgress

__all__ = ["Cloud", "GuestSession", "LogSink", "PermanentError", "ScriptProgress"]
