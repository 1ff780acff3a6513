"""The accelerator is chosen by booting the guest kit, and a guest that never shows
a sign of life is refused by `create` instead of being reported as started."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.drivers.qemu.binary import qemu_binary
from sanvisor.drivers.qemu.probe import AccelProbe, BootResult, boot_kit, kvm_module
from tests.guest.conftest import write_config
from tests.guest.helpers import Sanvisor, qemu_pids

pytestmark = pytest.mark.guest
QEMU = qemu_binary()


def test_the_probe_chooses_what_boots_the_kit(kit: object) -> None:
    """The regression of the first run: on a PVM host a boot-sector probe chose KVM
    and every guest hung. Now the kit itself is booted under KVM, and whatever the
    probe chooses must boot the kit to its ready marker."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm here: TCG is the only accelerator, nothing to decide")
    kernel, initrd = kit.kernel, kit.initrd  # type: ignore[attr-defined]
    seen: list[BootResult] = []

    def booter(accel: str, k: Path, i: Path | None) -> BootResult:
        seen.append(boot_kit(accel, k, i, qemu=QEMU))
        return seen[-1]

    choice = AccelProbe(lambda: (kernel, initrd), qemu=QEMU, booter=booter).decide({})
    assert len(seen) == 1, "the probe boots the kit under KVM exactly once"
    assert (choice.accel == "kvm") == seen[0].ok, (choice, seen)
    if kvm_module() == "pvm":
        assert choice.pvm
        if choice.accel == "tcg":
            assert "PVM variant" in choice.reason
    chosen = seen[0] if choice.accel == "kvm" else boot_kit("tcg", kernel, initrd, qemu=QEMU)
    assert chosen.ok, f"the chosen accelerator {choice.accel} does not boot the kit: {chosen}"


def _hang_kernel(path: Path) -> Path:
    """A multiboot image that spins at its entry in 32-bit mode, paging off, printing
    nothing: what a guest stuck in its firmware looks like."""
    magic, flags, load = 0x1BADB002, 0x00010000, 0x100000
    header = struct.pack("<8I", magic, flags, -(magic + flags) & 0xFFFFFFFF,
                         load, load, 0, 0, load + 32)
    path.write_bytes(header + b"\xeb\xfe" + b"\0" * 4096)  # jmp $
    return path


@pytest.fixture(scope="module")
def quick_agent(kit: object) -> Iterator[Sanvisor]:
    """An agent of its own that gives a new guest 3 s to show a sign of life."""
    home = Path(tempfile.mkdtemp(prefix="svacc", dir="/tmp"))
    s = Sanvisor(home, None)
    env = dict(os.environ, SANVISOR_LIFE_TIMEOUT="3")
    try:
        subprocess.run(s.argv("agent", "start"), check=True, capture_output=True,
                       timeout=120, env=env)
        yield s
    finally:
        s.run("agent", "stop", check=False)
        for pid in qemu_pids(home):
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, 9)
        shutil.rmtree(home, ignore_errors=True)


def test_a_guest_without_a_sign_of_life_is_refused(quick_agent: Sanvisor,
                                                   workdir: Path) -> None:
    cfg = write_config(workdir / "stuck.cfg", name="stuck", memory=96,
                       kernel=str(_hang_kernel(workdir / "hang.bin")))
    line = quick_agent.fail("create", str(cfg))
    accel = quick_agent.json("info")["accelerator"]
    assert "stuck showed no sign of life within 3 s" in line, line
    assert f"under {accel}" in line and "still in the firmware" in line, line
    assert "stuck" not in quick_agent.names()
    assert qemu_pids(quick_agent.home) == []
    assert list((quick_agent.home / "dom").iterdir()) == []


def test_info_shows_the_accelerator_and_why(quick_agent: Sanvisor) -> None:
    facts = quick_agent.json("info")
    assert facts["accelerator"] in ("tcg", "kvm")
    assert facts["accelerator_reason"]
    assert facts["driver"] == "qemu" and facts["nr_cpus"] >= 1
    text = quick_agent.run("info").stdout
    assert f"accelerator            : {facts['accelerator']}" in text  # xm info's shape


def test_a_bad_accel_override_is_refused_in_one_line(tmp_path: Path) -> None:
    s = Sanvisor(tmp_path / "home", None)
    proc = subprocess.run(s.argv("agent", "start"), capture_output=True, text=True,
                          env=dict(os.environ, SANVISOR_ACCEL="hvf"), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "sanvisor: error: SANVISOR_ACCEL='hvf': not an accelerator (use tcg or kvm)"]
    assert s.run("agent", "status", check=False).returncode == 3
