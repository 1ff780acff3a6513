"""The accelerator decision (drivers/qemu/probe.py) with an injected booter: what
is probed, what is cached per host boot, what overrides it, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from sanvisor.agent.daemon import life_timeout
from sanvisor.drivers.qemu import probe
from sanvisor.drivers.qemu.probe import AccelProbe, BootResult, forced_accel
from sanvisor.errors import ConfigError


class Booter:
    def __init__(self, result: BootResult) -> None:
        self.result = result
        self.calls: list[str] = []

    def __call__(self, accel: str, kernel: Path, initrd: Path | None) -> BootResult:
        self.calls.append(accel)
        return self.result


HANG = BootResult(False, 30.0, "no ready marker within 30 s (not a byte on its console)")
BOOTS = BootResult(True, 0.8, "")


@pytest.fixture
def kvm_dev(tmp_path: Path) -> str:
    dev = tmp_path / "kvm"
    dev.write_text("")
    return str(dev)


def _probe(tmp_path: Path, booter: Booter, kvm_dev: str, module: str = "") -> AccelProbe:
    tmp_path.mkdir(exist_ok=True)
    kernel = tmp_path / "vmlinux"
    if not kernel.exists():  # a rewritten kit (new mtime) is probed again
        kernel.write_text("k")
    return AccelProbe(lambda: (kernel, None), qemu="qemu", cache_dir=tmp_path / "cache",
                      booter=booter, kvm_dev=kvm_dev, module=lambda: module)


def test_override_values() -> None:
    assert forced_accel({}) is None
    assert forced_accel({"SANVISOR_ACCEL": ""}) is None
    assert forced_accel({"SANVISOR_ACCEL": "TCG"}) == "tcg"
    assert forced_accel({"SANVISOR_ACCEL": "kvm"}) == "kvm"
    with pytest.raises(ConfigError) as err:
        forced_accel({"SANVISOR_ACCEL": "hvf"})
    assert "SANVISOR_ACCEL='hvf'" in str(err.value) and "\n" not in str(err.value)


def test_no_kvm_device_means_tcg_without_booting(tmp_path: Path) -> None:
    booter = Booter(BOOTS)
    choice = _probe(tmp_path, booter, str(tmp_path / "absent")).decide({})
    assert (choice.accel, booter.calls) == ("tcg", [])
    assert "does not exist" in choice.reason


def test_kvm_chosen_only_when_the_kit_boots(tmp_path: Path, kvm_dev: str) -> None:
    assert _probe(tmp_path / "a", Booter(BOOTS), kvm_dev).decide({}).accel == "kvm"
    choice = _probe(tmp_path / "b", Booter(HANG), kvm_dev, module="pvm").decide({})
    assert choice.accel == "tcg" and choice.pvm
    assert "PVM variant" in choice.reason and "no ready marker" in choice.reason


def test_the_decision_is_cached_per_host_boot(tmp_path: Path, kvm_dev: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    booter = Booter(HANG)
    monkeypatch.setattr(probe, "boot_id", lambda: "boot-1")
    first = _probe(tmp_path, booter, kvm_dev).decide({})
    again = _probe(tmp_path, booter, kvm_dev).decide({})
    assert first == again and booter.calls == ["kvm"]
    monkeypatch.setattr(probe, "boot_id", lambda: "boot-2")  # the host rebooted
    _probe(tmp_path, booter, kvm_dev).decide({})
    assert booter.calls == ["kvm", "kvm"]


def test_forcing(tmp_path: Path, kvm_dev: str) -> None:
    booter = Booter(HANG)
    tcg = _probe(tmp_path, booter, kvm_dev).decide({"SANVISOR_ACCEL": "tcg"})
    assert (tcg.accel, tcg.forced, booter.calls) == ("tcg", True, [])
    kvm = _probe(tmp_path, booter, kvm_dev, module="pvm").decide({"SANVISOR_ACCEL": "kvm"})
    assert kvm.accel == "kvm" and kvm.forced
    assert "cannot run the guest kit" in kvm.warning and "no ready marker" in kvm.warning
    ok = _probe(tmp_path / "x", Booter(BOOTS), kvm_dev).decide({"SANVISOR_ACCEL": "kvm"})
    assert ok.warning == ""


def test_a_corrupt_cache_is_probed_again(tmp_path: Path, kvm_dev: str) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / probe.CACHE_NAME).write_text("{not json")
    booter = Booter(BOOTS)
    assert _probe(tmp_path, booter, kvm_dev).decide({}).accel == "kvm"
    assert booter.calls == ["kvm"]


def test_life_timeout_setting() -> None:
    assert life_timeout({}) == 30.0
    assert life_timeout({"SANVISOR_LIFE_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(ConfigError):
            life_timeout({"SANVISOR_LIFE_TIMEOUT": bad})
