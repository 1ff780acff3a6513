"""The domain state machine (model/lifecycle.py): every event in every state, and
the verbs each state admits, as a table; plus properties over all inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sanvisor.errors import ConflictError
from sanvisor.model.domain import Action, State
from sanvisor.model.lifecycle import (
    ADMITS,
    Busy,
    Decision,
    DomainEvent,
    EventKind,
    check,
    decide,
)

D, R, P = Action.DESTROY, Action.RESTART, Action.PRESERVE


def _decide(state: State, kind: EventKind, *, handled: bool = False, poweroff: Action = D,
            reboot: Action = R, crash: Action = D, busy: Busy = Busy.NONE,
            pending: bool = False) -> Decision:
    return decide(state, DomainEvent(kind, handled=handled), on_poweroff=poweroff,
                  on_reboot=reboot, on_crash=crash, busy=busy, reboot_pending=pending)


@pytest.mark.parametrize(("state", "kind", "kw", "want"), [
    (State.RUNNING, EventKind.PAUSED, {}, Decision(State.PAUSED)),
    (State.SHUTDOWN, EventKind.PAUSED, {}, Decision()),  # a preserved domain stays 's'
    (State.PAUSED, EventKind.RESUMED, {}, Decision(State.RUNNING)),
    (State.RUNNING, EventKind.POWERED_OFF, {}, Decision(action=D, reason="guest powered off")),
    (State.RUNNING, EventKind.POWERED_OFF, {"poweroff": P},
     Decision(State.SHUTDOWN, "guest powered off")),
    (State.RUNNING, EventKind.POWERED_OFF, {"pending": True},
     Decision(action=R, reason="rebooted on request", clear_reboot=True)),
    (State.RUNNING, EventKind.POWERED_OFF, {"handled": True},
     Decision(State.SHUTDOWN, "guest powered off")),
    (State.RUNNING, EventKind.RESET_REQUESTED, {"reboot": D},
     Decision(action=D, reason="guest rebooted")),
    (State.RUNNING, EventKind.CRASHED, {"crash": P},
     Decision(State.CRASHED, "guest crashed")),
    (State.RUNNING, EventKind.CRASHED, {},
     Decision(action=D, reason="guest crashed", crash=True)),
    (State.RUNNING, EventKind.CRASHED, {"crash": R},
     Decision(action=R, reason="guest crashed", crash=True)),
    (State.RUNNING, EventKind.RESTARTED, {},
     Decision(State.RUNNING, "rebooted", restarted=True, clear_reboot=True)),
    (State.PAUSED, EventKind.GONE, {}, Decision(forget=True,
                                                reason="removed by the hypervisor")),
    (State.RUNNING, EventKind.EXITED, {},
     Decision(State.LOST, "its hypervisor process exited unexpectedly", unplumb=True)),
    (State.RUNNING, EventKind.EXITED, {"busy": Busy.STOPPING}, Decision()),
    (State.RUNNING, EventKind.PAUSED, {"busy": Busy.SAVING}, Decision()),
    (State.DYING, EventKind.CRASHED, {}, Decision()),
])
def test_transitions(state: State, kind: EventKind, kw: dict[str, object],
                     want: Decision) -> None:
    assert _decide(state, kind, **kw) == want  # type: ignore[arg-type]


_ANY_STATE = st.sampled_from(list(State))
_ANY_EVENT = st.builds(DomainEvent, st.sampled_from(list(EventKind)), st.booleans())
_ANY_ACTION = st.sampled_from(list(Action))


@given(_ANY_STATE, _ANY_EVENT, _ANY_ACTION, _ANY_ACTION, _ANY_ACTION,
       st.sampled_from(list(Busy)), st.booleans())
def test_properties(state: State, event: DomainEvent, poweroff: Action, reboot: Action,
                    crash: Action, busy: Busy, pending: bool) -> None:
    d = decide(state, event, on_poweroff=poweroff, on_reboot=reboot, on_crash=crash,
               busy=busy, reboot_pending=pending)
    if busy is not Busy.NONE:
        assert d == Decision()  # work in progress: its news changes nothing
    assert not d.forget or event.kind is EventKind.GONE
    assert d.state is None or d.action is None  # one or the other, never both
    assert d.state is not State.DYING  # only a teardown makes a domain dying
    if d.action is Action.PRESERVE:
        raise AssertionError("preserve is a state, not an action to run")


def test_every_verb_in_every_state() -> None:
    table = {  # verb: the states it is refused in
        "pause": {State.PAUSED, State.SHUTDOWN, State.CRASHED, State.LOST, State.DYING},
        "unpause": set(State) - {State.PAUSED},
        "save": {State.SHUTDOWN, State.CRASHED, State.LOST, State.DYING},
        "mem-set": {State.SHUTDOWN, State.CRASHED, State.LOST, State.DYING},
        "reboot": {State.SHUTDOWN, State.CRASHED, State.LOST, State.DYING},
        "block-attach": {State.SHUTDOWN, State.CRASHED, State.LOST, State.DYING},
        "block-detach": {State.PAUSED, State.SHUTDOWN, State.CRASHED, State.LOST,
                         State.DYING},
        "destroy": set(),  # a dying copy's destroy is tried again (agent/life.py)
    }
    for verb, refused in table.items():
        for state in State:
            if state in refused:
                with pytest.raises(ConflictError) as err:
                    check(verb, state, "web1")
                msg = str(err.value)
                assert msg.startswith("web1 is ") and f": {verb} needs " in msg
                assert "\n" not in msg
            else:
                check(verb, state, "web1")
    assert set(table) <= set(ADMITS)


def test_refusals_name_the_state_and_the_way_out() -> None:
    with pytest.raises(ConflictError) as err:
        check("save", State.SHUTDOWN, "web1")
    assert str(err.value) == ("web1 is shut down (s): save needs a running or paused "
                              "domain; destroy it to clear it")
    with pytest.raises(ConflictError) as err:
        check("block-detach", State.PAUSED, "web1")
    assert str(err.value).endswith("needs a running domain; unpause it first")
    with pytest.raises(ConflictError) as err:
        check("unpause", State.DYING, "web1")
    assert str(err.value) == ("web1 is dying (d): unpause needs a paused domain; its "
                              "destroy failed and is retried (destroy tries it again now)")
