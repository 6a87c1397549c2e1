"""kiln's WinRM client and Windows session, pywinrm's real code underneath, against a WS-Management endpoint that
speaks WinRM over HTTPS with NTLM and fails as Windows does."""

from __future__ import annotations

import asyncio

import pytest

from activities.clouds.base import PermanentError
from activities.guest.windows_session import WindowsSession
from activities.guest.winrm import CommandTimedOut, GuestUnreachable, WinRmClient, WinRmFault
from tests.windows.conftest import client_for
from tests.wsman import WindowsMachine


async def run_to_end(session: WindowsSession, run_id: str, script: str, **how: bool) -> tuple[str, int]:
    await session.start_script(run_id, script, **how)
    output, offset = b"", 0
    while True:
        progress = await session.poll_script(run_id, offset)
        output += progress.output
        offset += len(progress.output)
        if progress.exit_code is not None:
            return output.decode(), progress.exit_code
        await asyncio.sleep(0.02)


async def test_a_command_runs_over_https_with_ntlm_and_the_pinned_certificate(
    machine: WindowsMachine, client: WinRmClient
) -> None:
    result = await client.run("echo hello from cmd")
    assert (result.stdout, result.exit_code) == (b"hello from cmd\r\n", 0)
    assert machine.endpoint is not None and machine.endpoint.shells == {}


async def test_another_certificate_than_the_pinned_one_is_refused_for_good(machine: WindowsMachine) -> None:
    impostor = client_for(machine, thumbprint="00" * 20)
    with pytest.raises(PermanentError) as refused:
        await impostor.run("echo never")
    assert refused.value.type == "HostKeyMismatch"
    assert machine.commands == []


async def test_a_refused_login_is_permanent(machine: WindowsMachine) -> None:
    """NTLM's handshake runs to its end and the service answers 401, as Windows does for a wrong password."""
    wrong = client_for(machine, password="not-the-password")
    with pytest.raises(PermanentError) as refused:
        await wrong.run("echo never")
    assert refused.value.type == "LoginRefused" and "refused" in refused.value.message
    assert machine.commands == []


async def test_a_failed_command_is_a_result_and_a_silent_guest_is_an_error(
    machine: WindowsMachine, client: WinRmClient
) -> None:
    failed = await client.run("not-a-command")
    assert failed.exit_code == 1 and b"is not recognized" in failed.stderr
    assert machine.endpoint is not None
    machine.endpoint.inject("Command", "http500")
    with pytest.raises(GuestUnreachable):
        await client.run("echo lost")
    machine.endpoint.inject("Command", "fault")
    with pytest.raises(WinRmFault, match="InternalError"):
        await client.run("echo refused")
    machine.endpoint.inject("Receive", "drop")
    with pytest.raises(GuestUnreachable):
        await client.run("echo cut")
    machine.endpoint.stop()
    with pytest.raises(GuestUnreachable, match="did not answer"):
        await client.run("echo nobody")


async def test_operation_timeouts_are_asked_again_until_the_command_ends(
    machine: WindowsMachine, client: WinRmClient
) -> None:
    assert machine.endpoint is not None
    machine.endpoint.inject("Receive", "timeout", times=3)
    result = await client.run("echo patient")
    assert result.stdout == b"patient\r\n"
    assert machine.endpoint.by_action["Receive"] == 4


async def test_a_command_past_its_own_deadline_fails_and_its_shell_is_closed(
    machine: WindowsMachine, client: WinRmClient
) -> None:
    """pywinrm's own receive loop would wait forever here: the guest keeps answering OperationTimeout."""
    with pytest.raises(CommandTimedOut):
        await client.run_powershell("Start-Sleep -s 100000", timeout=1.5)
    assert machine.endpoint is not None
    assert machine.endpoint.by_action["Signal"] == 1 and machine.endpoint.shells == {}


async def test_every_command_has_a_shell_of_its_own_closed_even_when_it_fails(
    machine: WindowsMachine, client: WinRmClient
) -> None:
    assert machine.endpoint is not None
    for command in ("echo one", "exit-with-an-error"):
        await client.run(command)
    machine.endpoint.inject("Receive", "fault")
    with pytest.raises(WinRmFault):
        await client.run("echo two")
    actions = machine.endpoint.by_action
    assert actions["Create"] == actions["Delete"] == 3 and machine.endpoint.shells == {}


async def test_a_script_far_longer_than_a_command_line_runs_whole_as_an_uploaded_file(
    machine: WindowsMachine, client: WinRmClient, session: WindowsSession
) -> None:
    lines = [f"Write-Output 'line {n:04d} of a long script, padded to be long enough'" for n in range(200)]
    script = "\n".join(lines) + "\nexit 7\n"
    assert len(script) > 8000
    too_long = await client.run("echo " + "x" * 8200)
    assert too_long.exit_code == 1 and b"The command line is too long." in too_long.stderr
    machine.longest_command_line = 0
    output, exit_code = await run_to_end(session, "long", script)
    assert exit_code == 7
    assert output.splitlines() == [f"line {n:04d} of a long script, padded to be long enough" for n in range(200)]
    assert 8000 < machine.longest_command_line <= 8191


async def test_a_script_runs_as_the_admin_the_admin_elevated_or_system(
    machine: WindowsMachine, session: WindowsSession
) -> None:
    """Elevated runs are scheduled tasks registered with the admin's password (a batch logon); SYSTEM's run as
    the service account; plain runs keep WinRM's network logon."""
    plain, _ = await run_to_end(session, "plain", "whoami\nwhoami /groups\n")
    elevated, _ = await run_to_end(session, "elevated", "whoami\nwhoami /groups\n", as_root=True)
    system, _ = await run_to_end(session, "system", "whoami\nwhoami /groups\n", as_system=True)
    admin = f"kilnwin01\\{machine.admin_user}"
    assert plain.splitlines()[0] == admin and "NT AUTHORITY\\NETWORK" in plain
    assert elevated.splitlines()[0] == admin and "NT AUTHORITY\\BATCH" in elevated
    assert "High Mandatory Level" in elevated
    assert system.splitlines()[0] == "nt authority\\system" and "System Mandatory Level" in system


async def test_an_elevated_run_with_a_wrong_password_does_not_start(
    machine: WindowsMachine, client: WinRmClient
) -> None:
    wrong = WindowsSession(client, username=machine.admin_user, password="stale")
    with pytest.raises(RuntimeError, match="user name or password is incorrect"):
        await wrong.start_script("refused", "whoami\n", as_root=True)
    assert "c:\\windows\\temp\\kiln\\runs\\refused" not in machine.runs


async def test_a_run_starts_once_reads_on_from_any_offset_and_can_be_stopped(
    machine: WindowsMachine, session: WindowsSession
) -> None:
    script = "Write-Output first\nStart-Sleep -s 30\nWrite-Output second\n"
    await session.start_script("twice", script)
    await session.start_script("twice", script)  # a retry on another worker: the same run
    [run] = machine.runs.values()
    assert run.starts == 2
    output, exit_code = await run_to_end(session, "twice", script)
    assert (output, exit_code) == ("first\r\nsecond\r\n", 0)
    assert (await session.poll_script("twice", len("first\r\n"))).output == b"second\r\n"

    await session.start_script("stopped", "Write-Output started\nStart-Sleep -s 100000\nWrite-Output never\n")
    await session.kill_script("stopped")
    progress = await session.poll_script("stopped", 0)
    assert progress.exit_code == 1 and b"never" not in progress.output
    with pytest.raises(PermanentError, match="never started"):
        await session.poll_script("unknown", 0)


async def test_a_run_the_machine_restarted_under_is_lost_not_waited_for(
    machine: WindowsMachine, session: WindowsSession
) -> None:
    await session.start_script("restarts", "Write-Output before\nRestart-Computer -Force\nWrite-Output after\n")
    async with asyncio.timeout(10):
        while machine.boots == 1:
            await asyncio.sleep(0.05)
        while True:
            try:
                await session.poll_script("restarts", 0)
            except GuestUnreachable:
                await asyncio.sleep(0.05)
                continue
            except PermanentError as lost:
                assert "restarted while the script ran" in lost.message
                break


async def test_files_go_to_existing_folders_only(machine: WindowsMachine, session: WindowsSession) -> None:
    data = bytes(range(256)) * 100  # several upload lines
    await session.upload(data, "C:\\Users\\" + machine.admin_user + "\\data.bin")
    assert machine.files.read(f"c:\\users\\{machine.admin_user}\\data.bin") == data
    assert await session.path_exists(f"C:\\Users\\{machine.admin_user}\\DATA.BIN")
    with pytest.raises(PermanentError) as missing:
        await session.upload(b"x", "c:\\buildArtifacts\\index.html")
    assert missing.value.type == "DestinationMissing" and "c:\\buildartifacts does not exist" in missing.value.message
    assert not await session.path_exists("c:\\buildArtifacts\\index.html")
