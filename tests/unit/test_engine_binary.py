"""The data-path engine is the only data path: without its binary, a one-line error
that says how to build it, and no agent (no fallback). Its watchdog's setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sanvisor.errors import ConfigError, ResourceError
from sanvisor.storage import engine


def test_a_missing_build_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.delenv("SANVISOR_ENGINE", raising=False)
    monkeypatch.setattr(engine, "SOURCE_BUILD", tmp_path / "build" / "sanvisor-engine")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(ResourceError) as exc:
        engine.engine_binary()
    msg = str(exc.value)
    assert "not built" in msg and "scripts/setup.sh" in msg and "make -C engine" in msg
    assert "\n" not in msg


def test_sanvisor_engine_naming_no_executable_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a program")
    for bad in (tmp_path / "absent", tmp_path / "plain"):
        monkeypatch.setenv("SANVISOR_ENGINE", str(bad))
        with pytest.raises(ResourceError, match=f"SANVISOR_ENGINE={bad}: no such executable"):
            engine.engine_binary()
    monkeypatch.setenv("SANVISOR_ENGINE", "/bin/true")
    assert engine.engine_binary() == Path("/bin/true")


def test_the_watchdog_setting() -> None:
    assert engine.watchdog_setting({}) == engine.WATCHDOG == 2.0
    assert engine.watchdog_setting({"SANVISOR_ENGINE_WATCHDOG": " 0.5 "}) == 0.5
    assert engine.watchdog_setting({"SANVISOR_ENGINE_WATCHDOG": "0"}) == 0  # off
    for bad in ("two", "-1", "nan", "inf", "1s"):
        with pytest.raises(ConfigError, match=f"SANVISOR_ENGINE_WATCHDOG='{bad}': seconds"):
            engine.watchdog_setting({"SANVISOR_ENGINE_WATCHDOG": bad})


@pytest.mark.parametrize("var, value, says", [
    ("SANVISOR_ENGINE", "{tmp}/absent", "SANVISOR_ENGINE={tmp}/absent: no such executable "
     "(build the data-path engine with scripts/setup.sh or make -C engine)"),
    ("SANVISOR_ENGINE_WATCHDOG", "soon", "SANVISOR_ENGINE_WATCHDOG='soon': seconds")])
def test_the_agent_does_not_start_without_its_engine(tmp_path: Path, var: str, value: str,
                                                     says: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "host.json").write_text(json.dumps({"driver": "fake"}))
    env = dict(os.environ, **{var: value.format(tmp=tmp_path)})
    sv = [sys.executable, "-m", "sanvisor", "--home", str(home)]
    try:
        proc = subprocess.run([*sv, "agent", "start"], capture_output=True, text=True,
                              env=env, timeout=60)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert says.format(tmp=tmp_path) in lines[0]
        status = subprocess.run([*sv, "agent", "status"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert status.returncode == 3 and "no agent running" in status.stdout, status
    finally:
        subprocess.run([*sv, "agent", "stop"], capture_output=True, timeout=60)
