"""The error tree is whole: every error class of the package is registered under a code
of its own, documented, and crosses the API (as JSON, and through a real agent server
to the real client) as the same class with its message, context and exit status."""

from __future__ import annotations

import gc
import importlib
import json
import logging
import math
import os
import pickle
import pkgutil
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import sanvisor
from sanvisor import errors
from sanvisor.api.app import build_app, http_status
from sanvisor.api.client import AgentClient, _exchange
from sanvisor.errors import (
    AgentProtocolError,
    ChannelError,
    CommandError,
    ConfigError,
    ConflictError,
    InternalError,
    NbdError,
    SanvisorError,
    XenHostError,
    from_dict,
)

ROOT = Path(__file__).resolve().parents[2]


def _import_every_module() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(sanvisor.__path__, "sanvisor.")
             if not m.name.endswith(".__main__")]  # importing __main__ runs the CLI
    for name in names:
        importlib.import_module(name)
    return names


MODULES = _import_every_module()  # before the registry is read: every class defined
REGISTRY: dict[str, type[SanvisorError]] = dict(errors._BY_CODE)
CODES = sorted(REGISTRY)

#: Codes are an interface: these never change (nor their classes' names).
STABLE = {
    "error": "SanvisorError", "config.invalid": "ConfigError", "usage": "UsageError",
    "domain.not_found": "NotFoundError", "conflict": "ConflictError",
    "resource.unavailable": "ResourceError", "device": "DeviceError",
    "guestkit": "GuestKitError", "hypervisor": "HypervisorError",
    "savefile.invalid": "SaveFileError", "timeout": "TimeoutError_",
    "agent.unavailable": "AgentUnavailableError", "command.failed": "CommandError",
    "nbd": "NbdError", "guest.command": "GuestCommandError", "xenhost": "XenHostError",
    "xenhost.channel": "ChannelError",
}

#: Classes whose __init__ is not SanvisorError's build their example here.
SPECIAL: dict[type[SanvisorError], Callable[[], SanvisorError]] = {
    ConfigError: lambda: ConfigError("memory: not a number", file="vm.cfg", line=4,
                                     key="memory"),
    CommandError: lambda: CommandError(["ip", "link", "add", "br0"], 2, "",
                                       "RTNETLINK answers: File exists\n"),
}


def _example(cls: type[SanvisorError]) -> SanvisorError:
    if cls in SPECIAL:
        return SPECIAL[cls]()
    assert cls.__init__ is SanvisorError.__init__, (
        f"{cls.__name__} has an __init__ of its own: give it an example in SPECIAL")
    return cls(f"a {cls.code} error", domain="web1", n=3, ratio=0.5, ok=True, none=None,
               items=["a", 1, None], nested={"k": [{"x": "y"}]})


def _subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def _same(a: SanvisorError, b: SanvisorError) -> None:
    assert type(a) is type(b)
    assert (a.code, a.message, str(a), a.context, a.exit_status) == (
        b.code, b.message, str(b), b.context, b.exit_status)


# ---- the registry ---------------------------------------------------------------------

def test_codes_are_unique_declared_and_stable() -> None:
    assert len(MODULES) > 50
    assert len(set(REGISTRY.values())) == len(REGISTRY)
    for code, cls in REGISTRY.items():
        assert cls.__dict__.get("code") == code, f"{cls.__name__} must declare its code"
        assert re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*", code), code
    assert {c: REGISTRY[c].__name__ for c in STABLE} == STABLE


def test_every_subclass_in_the_package_is_registered() -> None:
    ours = {c for c in _subclasses(SanvisorError) if c.__module__.startswith("sanvisor")}
    assert ours | {SanvisorError} == set(REGISTRY.values())


def test_the_client_knows_every_code_without_importing_the_package() -> None:
    """The CLI imports the client and errors.py, not storage/lab/xenhost: a class defined
    elsewhere would come back to it as a plain SanvisorError. So all live in errors.py."""
    out = subprocess.run(
        [sys.executable, "-c", "import json, sanvisor.api.client, sanvisor.errors as e; "
         "print(json.dumps(sorted((c, k.__module__) for c, k in e._BY_CODE.items())))"],
        capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [[c, "sanvisor.errors"] for c in CODES]


def test_a_class_must_declare_a_code_of_its_own() -> None:
    with pytest.raises(TypeError, match="must declare its own error code"):
        class NoCode(ConflictError):
            pass
    with pytest.raises(TypeError, match=r"'conflict' .* is taken by sanvisor\.errors"):
        class Taken(SanvisorError):
            code = "conflict"
    gc.collect()  # the half-made classes leave the __subclasses__ lists
    assert errors._BY_CODE == REGISTRY


def test_no_bare_sanvisor_error_is_raised() -> None:
    """Outside errors.py, every error raised on purpose is of a class that says what it
    is (and has a code a script can test); add one to the tree if none fits."""
    src = Path(sanvisor.__file__).parent
    bare = [f"{f.relative_to(src)}:{n}" for f in sorted(src.rglob("*.py"))
            if f.name != "errors.py"
            for n, line in enumerate(f.read_text().splitlines(), 1)
            if re.search(r"\bSanvisorError\(", line)]
    assert bare == []


def test_every_code_is_documented() -> None:
    """docs/architecture.md, "Errors": code, class, exit status, HTTP status."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `(\w+)` \| (\d+) \| (\d+) \| .+\|$", section,
                      re.MULTILINE)
    documented = {code: (cls, int(ex), int(http)) for code, cls, ex, http in rows}
    assert documented == {
        code: (cls.__name__, cls.exit_status, http_status(_example(cls)))
        for code, cls in REGISTRY.items()}


# ---- rebuilding -----------------------------------------------------------------------

@pytest.mark.parametrize("code", CODES)
def test_round_trip_as_json(code: str) -> None:
    err = _example(REGISTRY[code])
    wire = json.dumps(err.to_dict(), allow_nan=False)
    back = from_dict(json.loads(wire))
    _same(back, err)
    assert back.to_dict() == err.to_dict()
    _same(pickle.loads(pickle.dumps(err)), err)


def test_rebuilt_errors_keep_their_attributes() -> None:
    cfg = from_dict(SPECIAL[ConfigError]().to_dict())
    assert isinstance(cfg, ConfigError)
    assert (str(cfg), cfg.file, cfg.line) == ("vm.cfg:4: memory: not a number", "vm.cfg", 4)
    cmd = from_dict(SPECIAL[CommandError]().to_dict())
    assert isinstance(cmd, CommandError)
    assert str(cmd) == "ip failed (rc=2): RTNETLINK answers: File exists"
    assert (cmd.cmd, cmd.rc, cmd.out, cmd.err) == (
        ["ip", "link", "add", "br0"], 2, "", "RTNETLINK answers: File exists\n")
    named = CommandError(["ip", "link", "add", "br0"], 1, "", "no", what="ip link add br0")
    assert str(named) == "ip link add br0 failed (rc=1): no"


def test_an_unknown_code_keeps_its_code_under_its_nearest_known_class() -> None:
    err = from_dict({"code": "xenhost.channel.reset", "message": "dom0 reset", "context": {}})
    assert type(err) is ChannelError and err.code == "xenhost.channel.reset"
    assert isinstance(err, XenHostError) and str(err) == "dom0 reset"
    err = from_dict({"code": "volume.full", "message": "vg0 is full"})
    assert type(err) is SanvisorError and err.code == "volume.full" and err.exit_status == 1
    assert err.to_dict() == {"code": "volume.full", "message": "vg0 is full", "context": {}}


@pytest.mark.parametrize(("data", "message", "context"), [
    ({}, "error (no message given)", {}),
    ({"code": "nbd"}, "nbd (no message given)", {}),
    ({"code": 404, "message": ["a"], "context": [1, 2]}, "['a']", {"context": [1, 2]}),
    ({"code": None, "message": "m", "context": "why"}, "m", {"context": "why"}),
    ({"message": "m", "context": {"message": "clash", "code": "x"}}, "m",
     {"message": "clash", "code": "x"}),
    ("a string", "the agent sent a malformed error: a string", {}),
    (None, "the agent sent a malformed error: None", {}),
])
def test_garbage_gives_a_sanvisor_error(data: Any, message: str,
                                        context: dict[str, Any]) -> None:
    err = from_dict(data)
    assert isinstance(err, SanvisorError)
    assert (str(err), err.context) == (message, context)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
ERROR_BODY = st.fixed_dictionaries({}, optional={
    "code": st.sampled_from(CODES) | st.from_regex(r"[a-z.]{1,20}", fullmatch=True) | JSON,
    "message": st.text() | JSON,
    "context": st.dictionaries(st.text(max_size=8), JSON, max_size=5) | JSON,
})


@settings(max_examples=400, deadline=None)
@given(st.one_of(ERROR_BODY, JSON))
def test_from_dict_takes_anything(data: Any) -> None:
    err = from_dict(data)
    assert isinstance(err, SanvisorError)
    assert isinstance(str(err), str) and isinstance(err.context, dict)
    wire = err.to_dict()
    json.dumps(wire, allow_nan=False)
    again = from_dict(json.loads(json.dumps(wire)))
    assert type(again) is type(err) and again.to_dict() == wire


ODD = st.one_of(JSON, st.builds(Path, st.text(max_size=10)), st.binary(max_size=10),
                st.sets(st.integers(), max_size=3), st.tuples(st.integers(), st.text()),
                st.sampled_from([math.nan, math.inf, -math.inf, object()]))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CODES), st.text(min_size=1),
       st.dictionaries(st.text(min_size=1, max_size=8).filter(
                           lambda k: k.isidentifier() and k != "message"), ODD,
                       max_size=5))
def test_any_context_crosses_as_json(code: str, message: str, context: dict[str, Any]) -> None:
    cls = REGISTRY[code]
    err = SPECIAL[cls]() if cls in SPECIAL else cls(message, **context)
    wire = json.loads(json.dumps(err.to_dict(), allow_nan=False))
    back = from_dict(wire)
    assert type(back) is cls and str(back) == str(err)
    assert back.to_dict() == wire


# ---- through a real agent server ------------------------------------------------------

class PathBody(BaseModel):
    path: str


class AmountBody(BaseModel):
    value: int


def _test_routes(app: FastAPI) -> None:
    """Routes that fail as handlers do, on the real app (its handler and middleware)."""

    @app.post("/test/raise/{code}")
    async def raise_(code: str) -> None:
        raise _example(REGISTRY[code])

    @app.post("/test/save")
    async def save(body: PathBody) -> None:  # as HostService.save opens its temp file
        os.close(os.open(body.path + ".part", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))

    @app.post("/test/lookup/{ref}")
    def lookup(ref: str) -> None:  # a plain def: run in a worker thread
        raise KeyError(ref)

    @app.post("/test/group/{ref}")
    async def group(ref: str) -> None:
        raise ExceptionGroup("task group", [ConflictError(f"{ref} is busy", domain=ref)])

    @app.post("/test/amount")
    async def amount(body: AmountBody) -> int:
        return body.value


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose path leaves room for a unix socket's name (108 bytes at most)."""
    with tempfile.TemporaryDirectory(prefix="sverr", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentClient]:
    """The real app (build_app, with a service that is never called) served as the
    daemon serves it: uvicorn on a 0600 unix socket with the peer-credential check."""
    import uvicorn

    from sanvisor.agent.daemon import _bind, _peer_checked_protocol

    app = build_app(SimpleNamespace(m=None))  # type: ignore[arg-type]
    _test_routes(app)
    home = tempfile.TemporaryDirectory(prefix="sverr", dir="/tmp")
    path = Path(home.name) / "agent.sock"
    sock = _bind(path)
    server = uvicorn.Server(uvicorn.Config(app, fd=sock.fileno(), log_level="warning",
                                           http=_peer_checked_protocol(), lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield AgentClient(path, timeout=10)
    server.should_exit = True
    thread.join(10)
    sock.close()
    home.cleanup()


@pytest.mark.parametrize("code", CODES)
def test_round_trip_through_the_agent(agent: AgentClient, code: str) -> None:
    sent = _example(REGISTRY[code])
    with pytest.raises(SanvisorError) as caught:
        agent.call("POST", f"/test/raise/{code}")
    _same(caught.value, sent)
    status, _ = _exchange(str(agent.socket_path), f"POST /test/raise/{code} HTTP/1.1\r\n"
                          "Host: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                          .encode(), 10)
    assert status == http_status(sent)


def test_an_unexpected_exception_reaches_the_user_as_its_cause(
        agent: AgentClient, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`save DOM /no/such/dir/x` gave "agent sent a malformed reply (500)"."""
    target = tmp_path / "no" / "such" / "dir" / "x"
    with caplog.at_level(logging.ERROR, logger="sanvisor.agent.api"), \
            pytest.raises(SanvisorError) as caught:
        agent.call("POST", "/test/save", {"path": str(target)})
    err = caught.value
    assert type(err) is InternalError and err.exit_status == 1
    assert str(err) == f"No such file or directory: '{target}.part'"
    assert err.context == {"type": "FileNotFoundError", "errno": 2,
                           "request": "POST /test/save"}
    logged = [r for r in caplog.records if r.name == "sanvisor.agent.api"]
    assert len(logged) == 1 and logged[0].exc_info is not None  # with the traceback
    assert "FileNotFoundError" in logged[0].getMessage()


def test_other_unexpected_exceptions_say_their_type(agent: AgentClient) -> None:
    with pytest.raises(InternalError, match=r"^KeyError: 'web1'$"):
        agent.call("POST", "/test/lookup/web1")
    with pytest.raises(ConflictError, match=r"^web1 is busy$"):  # out of its task group
        agent.call("POST", "/test/group/web1")


def test_replies_that_are_not_errors_of_ours(agent: AgentClient) -> None:
    assert agent.call("POST", "/test/amount", {"value": 3}) == 3
    with pytest.raises(AgentProtocolError, match=r"refused GET /v1/nope \(404\): Not Found"):
        agent.call("GET", "/v1/nope")
    with pytest.raises(AgentProtocolError, match=r"\(422\): body\.value: .*integer") as c:
        agent.call("POST", "/test/amount", {"value": "lots"})
    assert c.value.context == {"status": 422, "method": "POST", "path": "/test/amount"}


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 21\r\n\r\nInternal Server Error",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{nope",
])
def test_a_malformed_reply_says_what_came(short_dir: Path, reply: bytes) -> None:
    path = short_dir / "s.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(1)

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(AgentProtocolError, match="malformed reply to GET /v1/host") as c:
            AgentClient(path, timeout=10).host()
        thread.join(10)
    assert reply.rsplit(b"\n", 1)[1].decode() in str(c.value)


def test_the_classes_raised_elsewhere_are_those_of_the_tree() -> None:
    from sanvisor.lab.guestshell import GuestCommandError
    from sanvisor.storage.nbdclient import NbdError as FromStorage
    from sanvisor.xenhost.channel import ChannelError as FromChannel
    from sanvisor.xenhost.packages import XenHostError as FromPackages

    assert (FromStorage, FromChannel, FromPackages) == (NbdError, ChannelError, XenHostError)
    assert GuestCommandError is errors.GuestCommandError
