"""Both ends of a migration run the same QEMU: `-M pc` is each QEMU's newest machine
type, so a 7.2 source and a 10.0 target could not load each other's stream. The target
refuses in one line naming both versions, before it reserves anything."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sanvisor.errors import ConflictError
from sanvisor.model.config import parse_config
from sanvisor.model.migration import ConvergencePolicy
from tests.unit.test_incoming_faults import Target


def _body(t: Target, version: object) -> dict[str, Any]:
    spec = parse_config("name='g1'\nmemory=64\n", filename="g1.cfg").spec

    async def record() -> dict[str, Any]:
        source = Target(t.layout.home.parent / "source")
        await source.svc.create(spec)
        rec = source.svc.table.find("g1").record
        await source.svc.destroy("g1")
        return rec.to_dict()

    body = {"record": asyncio.run(record()), "disks": {}, "live": True,
            "policy": ConvergencePolicy().to_dict(), "driver": "fake",
            "accelerator": "fake", "source": "", "token": None}
    if version is not None:
        body["hypervisor_version"] = version
    return body


def test_a_different_qemu_is_refused_naming_both(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    t = Target(tmp_path / "t")
    monkeypatch.setattr(t.driver, "hypervisor_version", lambda: "10.0.2")
    with pytest.raises(ConflictError, match=r"^migrate: the target runs fake 10\.0\.2, the "
                                            r"source fake 7\.2\.22 \(both ends"):
        asyncio.run(t.migs.incoming(_body(t, "7.2.22")))
    assert "g1" not in {d.name for d in t.svc.table} and not t.migs.pending


@pytest.mark.parametrize("version", ["10.0.2", None, ""])
def test_the_same_or_an_unknown_version_is_let_through(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        version: str | None) -> None:
    t = Target(tmp_path / "t")
    monkeypatch.setattr(t.driver, "hypervisor_version", lambda: "10.0.2")
    asyncio.run(t.migs.incoming(_body(t, version)))
    assert "g1" in {d.name for d in t.svc.table}
