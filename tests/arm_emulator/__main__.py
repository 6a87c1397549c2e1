"""`python -m tests.arm_emulator [--port N] [--polls N]`: serve the ARM emulator until Ctrl-C."""

from __future__ import annotations

import argparse
import threading

from . import ArmEmulator


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.arm_emulator", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--polls", type=int, default=1, help="InProgress answers per long-running operation")
    args = parser.parse_args()
    emulator = ArmEmulator(port=args.port, operation_polls=args.polls)
    base_url = emulator.start()
    print(f"ARM emulator on {base_url}", flush=True)
    print("  client: ComputeManagementClient(FakeCredential(), sub, **client_kwargs(base_url))", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


if __name__ == "__main__":
    main()
