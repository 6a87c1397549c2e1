"""The demo: a real golden-image build on this machine, end to end (`make demo`).

It starts the embedded Temporal dev server, Azurite and a local worker (`python worker.py --dev`), serves
`examples/files/` on a loopback port for the template's scriptUri and sourceUri, makes the local gallery the
template distributes to, builds `examples/debian-golden.json` with `kiln build` (whose validator runs in the
captured image booted in QEMU), shows the end of that boot's serial console, and then opens the gallery image
it produced, read-only, to show the customization inside it.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console

PROJECT = Path(__file__).resolve().parent.parent
TEMPLATE = PROJECT / "examples" / "debian-golden.json"
FILES_PORT = 8780  # the port the example template's URIs name
KILN = [sys.executable, "-m", "cli"]
console = Console(highlight=False)


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # the build's own log shows each fetch


def serve_examples() -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietFiles, directory=str(PROJECT / "examples"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", FILES_PORT), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_for_port(port: int, seconds: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None:
            raise SystemExit(f"the worker exited with code {process.returncode}; see its output above")
        time.sleep(0.2)
    raise SystemExit(f"nothing answered on 127.0.0.1:{port} after {seconds:.0f} s")


def kiln(*args: str) -> int:
    return subprocess.call([*KILN, *args], cwd=PROJECT)


def gallery_image_id() -> str:
    template = json.loads(TEMPLATE.read_text())
    return next(d["galleryImageId"] for d in template["properties"]["distribute"] if d["type"] == "SharedImage")


async def final_status(name: str):  # noqa: ANN201 - BuildStatus, imported lazily with the project
    from activities.connection import connect
    from workflows.build import ImageBuildWorkflow

    client = await connect()
    return await client.get_workflow_handle(name).query(ImageBuildWorkflow.status)


async def open_image(artifact_id: str) -> Path:
    """The gallery version's VHD, fetched (sparse) from the region's storage account in Azurite."""
    from activities.clouds.local.records import ResourceStore
    from activities.clouds.local.storage import LocalStorage

    async with LocalStorage(store=ResourceStore()) as storage:
        return (await storage.locate_image(artifact_id)).vhd_path


def debugfs(image: Path, request: str) -> str:
    """Read the image's root filesystem without changing it (debugfs without -w), at its partition's offset."""
    from activities.clouds.local.disks import root_partition

    filesystem = f"{image}?offset={root_partition(image).offset}"
    return subprocess.run(["debugfs", "-R", request, filesystem], capture_output=True, text=True).stdout.strip()


def show_boot(status) -> None:  # noqa: ANN001 - BuildStatus, imported lazily with the project
    """The end of the validation VM's serial console: the captured disk booted in QEMU to a login prompt."""
    from activities.clouds.local.admin import read_log

    console_log = status.log_uri.rsplit("/", 1)[0] + "/console.log"
    lines = asyncio.run(read_log(console_log)).decode(errors="replace").splitlines()
    if not lines:
        return
    console.rule("[bold]the image, booted for real (serial console, last lines)")
    for line in lines[-8:]:
        console.print(line, markup=False)


def show_inside(image: Path) -> None:
    console.rule("[bold]inside the image (read-only)")
    console.print("/etc/kiln-release:", debugfs(image, "cat /etc/kiln-release"))
    enabled = debugfs(image, "stat /etc/systemd/system/multi-user.target.wants/nginx.service")
    console.print("nginx:", "installed, enabled at boot" if "Inode:" in enabled else "[red]not enabled")
    console.print("/etc/motd:", debugfs(image, "cat /etc/motd"))
    passwd = debugfs(image, "cat /etc/passwd")
    left = [line.split(":")[0] for line in passwd.splitlines() if line.startswith("kiln")]
    console.print("build user:", f"[red]still there: {', '.join(left)}" if left else "removed by deprovision")
    host_keys = debugfs(image, "ls /etc/ssh")
    console.print("SSH host keys:", "[red]still there" if "ssh_host_" in host_keys else "removed by deprovision")


def main() -> int:
    os.chdir(PROJECT)
    # A closed terminal or a `kill` stops the demo as Ctrl-C does, and the demo stops the worker (in a session of
    # its own, so that it hears only the demo), which stops Temporal and Azurite. An ignored signal (nohup) stays so.
    for stop in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(stop) is not signal.SIG_IGN:
            signal.signal(stop, signal.default_int_handler)
    console.rule("[bold]kiln demo: a Debian 12 golden image, built on this machine")
    worker = subprocess.Popen([sys.executable, "worker.py", "--dev"], cwd=PROJECT, start_new_session=True)
    files = serve_examples()
    try:
        wait_for_port(7233, 120, worker)
        if kiln("gallery", "create", gallery_image_id(), "--location", "westeurope") != 0:
            return 1
        name = f"debian-golden-{datetime.now():%Y%m%d-%H%M%S}"
        code = kiln("build", str(TEMPLATE), "--name", name)
        status = asyncio.run(final_status(name))
        show_boot(status)
        gallery = next((o for o in status.run_outputs if o.type == "SharedImage" and o.artifact_id), None)
        if gallery is not None:
            image = asyncio.run(open_image(gallery.artifact_id))
            show_inside(image)
        console.rule()
        console.print(f"The build's history: http://127.0.0.1:8233/namespaces/default/workflows/{name}")
        console.print("Temporal, Azurite and the worker keep running for you to look; Ctrl-C stops them.")
        worker.wait()
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        files.shutdown()
        if worker.poll() is None:
            worker.terminate()
            worker.wait()


if __name__ == "__main__":
    sys.exit(main())
