"""A Windows machine for tests: a WS-Management endpoint that pywinrm's real code talks to, over HTTPS with NTLM,
in front of a scripted machine (files, processes, restarts, Windows Update, sysprep). See ``machine`` and
``server``."""

from tests.wsman.machine import GENERALIZED, Identity, MachineSettings, WindowsMachine
from tests.wsman.updates import Update

__all__ = ["GENERALIZED", "Identity", "MachineSettings", "Update", "WindowsMachine"]
