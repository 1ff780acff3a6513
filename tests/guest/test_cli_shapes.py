"""What a user meets at the command line, verb by verb, on one real guest: --json
everywhere with one meaning, exit statuses (2 usage, 1 refusal), xm's success lines,
Domain-0 as a domain, create -n as a preview, one console session at a time."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.conftest import write_config
from tests.guest.helpers import Sanvisor, wait_until

pytestmark = pytest.mark.guest
NAME = "cli1"
MAC = "00:16:3e:5a:00:01"


@pytest.fixture(scope="module")
def guest(qemu_sv: Sanvisor, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, object]]:
    d = tmp_path_factory.mktemp("cli")
    disk = d / "sda.img"
    disk.write_bytes(b"\0" * (8 << 20))
    cfg = write_config(d / "cli1.cfg", name=NAME, memory=128, vif=[f"mac={MAC},type=user"],
                       disk=[f"file:{disk},sda,w"])
    out = qemu_sv.run("create", str(cfg)).stdout
    try:
        assert out.strip() == f"Started domain {NAME} (id={qemu_sv.domain(NAME)['domid']})"
        qemu_sv.wait_marker(NAME)
        yield {"cfg": cfg, **qemu_sv.domain(NAME)}
    finally:
        qemu_sv.run("destroy", NAME, check=False)


def test_json_anywhere_and_the_same_meaning(qemu_sv: Sanvisor,
                                            guest: dict[str, object]) -> None:
    before = json.loads(qemu_sv.run("--json", "list", NAME).stdout)
    after = json.loads(qemu_sv.run("list", NAME, "--json").stdout)
    assert [r["name"] for r in before] == [r["name"] for r in after] == [NAME]
    paused = json.loads(qemu_sv.run("pause", NAME, "--json").stdout)
    assert (paused["name"], paused["state"]) == (NAME, "paused")  # the domain, not the ref
    resumed = json.loads(qemu_sv.run("--json", "unpause", str(guest["domid"])).stdout)
    assert resumed["name"] == NAME and resumed["state"] in ("running", "blocked")
    up = json.loads(qemu_sv.run("uptime", "--json").stdout)
    assert {tuple(sorted(r)) for r in up} == {("domid", "name", "uptime", "uuid")}
    frame = json.loads(qemu_sv.run("top", "-n", "1", "--json").stdout)
    row = next(r for r in frame["domains"] if r["name"] == NAME)
    assert row["vcpus"] == 1 and row["mem_kib"] == 128 << 10


def test_exit_statuses(qemu_sv: Sanvisor, guest: dict[str, object]) -> None:
    def rc(*args: str) -> int:
        return qemu_sv.run(*args, check=False).returncode

    assert rc("mem-set", NAME, "32") == 1  # a refusal
    assert rc("mem-set", NAME, "1g") == 1  # above maxmem: a refusal
    assert rc("mem-set", NAME, "lots") == 2  # not an amount: usage
    assert rc("pause", "--bogus", NAME) == 2
    assert rc("uptime", "nosuch") == 1 and rc("list", "nosuch") == 1
    assert "does not exist" in qemu_sv.fail("uptime", "nosuch")


def test_domain0_is_a_domain(qemu_sv: Sanvisor, guest: dict[str, object]) -> None:
    assert qemu_sv.run("domid", "Domain-0").stdout.strip() == "0"
    assert qemu_sv.run("domname", "0").stdout.strip() == "Domain-0"
    rows = qemu_sv.run("uptime", "Domain-0", NAME).stdout.splitlines()
    assert [r.split()[0] for r in rows[1:]] == ["Domain-0", NAME]


def test_create_dry_run_checks_everything_and_starts_nothing(
        qemu_sv: Sanvisor, guest: dict[str, object], workdir: Path) -> None:
    registry = (qemu_sv.home / "registry.json").read_text()
    disk = workdir / "d.img"
    disk.write_bytes(b"\0" * (1 << 20))
    cfg = write_config(workdir / "dry.cfg", name="dry1", memory=128,
                       vif=["type=user"], disk=[f"file:{disk},sda,w"])
    text = qemu_sv.run("create", "-n", str(cfg)).stdout
    assert text.startswith("(vm\n    (name dry1)")
    assert "(kernel /" in text and "(ramdisk /" in text  # the kit that would boot
    assert f"(uname file:{disk})" in text and "(mac 00:16:3e:" in text
    plan = json.loads(qemu_sv.run("create", "-n", str(cfg), "--json").stdout)
    assert plan["kernel"] and plan["nics"][0]["mac"].startswith("00:16:3e:")
    assert "dry1" not in qemu_sv.names()
    assert (qemu_sv.home / "registry.json").read_text() == registry  # nothing remembered
    # every check create runs: a MAC clash, a missing disk
    clash = write_config(workdir / "clash.cfg", name="dry2", vif=[f"mac={MAC},type=user"])
    assert f"MAC {MAC} is already used by domain {NAME}" in qemu_sv.fail("create", "-n",
                                                                        str(clash))
    gone = write_config(workdir / "gone.cfg", name="dry3", disk=["file:/no/such.img,sda,w"])
    assert "no such file" in qemu_sv.fail("create", "-n", str(gone))


def test_devices_and_saves_refused_in_one_line(qemu_sv: Sanvisor,
                                               guest: dict[str, object],
                                               workdir: Path) -> None:
    line = qemu_sv.fail("network-attach", NAME, f"mac={MAC}")
    assert f"already has MAC {MAC}" in line
    extra = workdir / "x.img"
    extra.write_bytes(b"\0" * (1 << 20))
    line = qemu_sv.fail("block-attach", NAME, f"file:{extra}", "xvda")
    assert "sda and xvda name the same disk" in line, line
    line = qemu_sv.fail("save", NAME, "/no/such/dir/x.save")
    assert line == "sanvisor: error: save: /no/such/dir: no such directory"
    assert qemu_sv.domain(NAME)["state"] in ("running", "blocked")


def test_one_console_session_at_a_time(qemu_sv: Sanvisor,
                                       guest: dict[str, object]) -> None:
    first = subprocess.Popen(qemu_sv.argv("console", NAME), stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = Path(str(guest["console_socket"]) + ".lock")
    try:
        wait_until("the first session's lock", lambda: lock.exists()
                   and lock.read_text().strip() == str(first.pid), 30)
        line = qemu_sv.fail("console", NAME)
        assert f"{NAME}'s console is attached by another session (pid {first.pid})" in line
    finally:
        assert first.stdin is not None
        first.stdin.close()  # EOF on a non-tty stdin detaches
        first.wait(timeout=30)
        assert first.stderr is not None
        err = first.stderr.read()
        first.stderr.close()
    assert b"another session tried to attach" in err
    assert first.returncode == 0


def test_create_and_restore_paused_and_uuid_refs(qemu_sv: Sanvisor, workdir: Path) -> None:
    cfg = write_config(workdir / "held.cfg", name="held1", memory=96)
    out = qemu_sv.run("create", "-p", str(cfg)).stdout
    try:
        assert out.strip().endswith(", paused")
        row = qemu_sv.domain("held1")
        assert row["state"] == "paused"
        log = Path(str(row["console_log"]))
        assert not log.exists() or b"SANVISOR-READY" not in log.read_bytes()
        by_uuid = json.loads(qemu_sv.run("pause", row["uuid"], "--json", check=False).stdout
                             or "{}")
        assert by_uuid == {}  # pausing a paused domain is refused...
        assert "held1 is paused (p): pause needs a running domain" in qemu_sv.fail(
            "pause", row["uuid"])  # ...by its uuid as by its name
        save = workdir / "held1.save"
        qemu_sv.run("save", row["uuid"], str(save))
        back = json.loads(qemu_sv.run("--json", "restore", "-p", str(save)).stdout)
        assert back["state"] == "paused" and back["uuid"] == row["uuid"]
        qemu_sv.run("unpause", "held1")
        qemu_sv.wait_marker("held1")
    finally:
        qemu_sv.run("destroy", "held1", check=False)


def test_the_agent_socket_is_the_owners_only(qemu_sv: Sanvisor) -> None:
    sock = qemu_sv.home / "agent.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(qemu_sv.home.stat().st_mode & 0o777) == "0o700"
    if os.geteuid() != 0:
        pytest.skip("the peer check needs another uid to try: root only")
    # another uid that could reach the socket (its mode opened up) is still refused
    import socket

    mode, home_mode = sock.stat().st_mode, qemu_sv.home.stat().st_mode
    read, write = os.pipe()
    try:
        os.chmod(sock, 0o666)
        os.chmod(qemu_sv.home, 0o755)
        pid = os.fork()
        if pid == 0:  # the child: uid 65534 (nobody), talks to the agent
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(20)
                s.connect(str(sock))
                s.sendall(b"GET /v1/host HTTP/1.1\r\nHost: x\r\n\r\n")
                os.write(write, b"answer:" + s.recv(100))
            except BaseException as exc:
                os.write(write, f"error:{exc}".encode())
            finally:
                os._exit(0)
        os.close(write)
        write = -1
        got = os.read(read, 200)
        os.waitpid(pid, 0)
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
        os.chmod(sock, mode & 0o777)
        os.chmod(qemu_sv.home, home_mode & 0o777)
    # closed at once: nothing answered (empty read, or a reset/broken pipe as it sent)
    assert got in (b"answer:", b"error:[Errno 104] Connection reset by peer",
                   b"error:[Errno 32] Broken pipe"), got
    assert "refused a connection from uid 65534" in (qemu_sv.home / "agent.log").read_text()
