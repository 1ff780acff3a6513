"""A domain's life, written once: the events a driver reports, what each does to the
domain's state, and which verbs each state admits. I/O-free (qemu.qmp's Runstate
is the model: an explicit enum, transitions in one place, unit-tested).

Drivers translate their hypervisor's news (QMP events, changes in `xl list`) into
:class:`DomainEvent`; the agent asks :func:`decide` what follows and does it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sanvisor.errors import ConflictError
from sanvisor.model.domain import Action, State


class EventKind(enum.StrEnum):
    PAUSED = "paused"  # the vCPUs stopped (QMP STOP; xl shows 'p')
    RESUMED = "resumed"  # they run again
    POWERED_OFF = "powered_off"  # the guest shut itself down (or obeyed the power button)
    RESET_REQUESTED = "reset_requested"  # the guest rebooted itself (QEMU -no-reboot)
    RESTARTED = "restarted"  # the hypervisor started it again itself (xl: a new domid)
    CRASHED = "crashed"  # the guest panicked
    GONE = "gone"  # the hypervisor removed it (xl applied on_*=destroy)
    EXITED = "exited"  # its hypervisor process died (QEMU killed or crashed)


@dataclass(frozen=True)
class DomainEvent:
    kind: EventKind
    handled: bool = False  # the hypervisor applied the config's on_* action itself (xl)
    domid: int | None = None  # RESTARTED: the new domain id
    detail: str = ""  # the hypervisor's own word (QMP's reason, xl's state column)


class Busy(enum.StrEnum):
    """Work in progress on a domain during which the driver's news is expected."""

    NONE = ""
    SAVING = "saving"
    MIGRATING = "migrating"
    STOPPING = "stopping"  # destroy/teardown: its exit is ours


@dataclass(frozen=True)
class Decision:
    """What an event means: the state to record (None: unchanged), the config's action
    to apply, and whether the domain is gone for good."""

    state: State | None = None
    reason: str = ""
    action: Action | None = None  # apply this on_* action (crash: from on_crash)
    crash: bool = False  # the action answers a crash (preserve -> 'c', not 's')
    forget: bool = False  # remove the domain (its hypervisor already did)
    restarted: bool = False  # a new domid / pid to take from the driver
    unplumb: bool = False  # its NICs' taps can go
    clear_reboot: bool = False  # the pending `reboot` request is answered


IGNORE = Decision()
_PRESERVED = (State.SHUTDOWN, State.CRASHED)


def decide(state: State, event: DomainEvent, *, on_poweroff: Action, on_reboot: Action,
           on_crash: Action, busy: Busy = Busy.NONE, reboot_pending: bool = False
           ) -> Decision:
    """The one transition function of a domain."""
    if busy is not Busy.NONE or state is State.DYING:
        return IGNORE  # saving, migrating or stopping: the news is ours
    kind = event.kind
    if kind is EventKind.PAUSED:
        return IGNORE if state in _PRESERVED else Decision(State.PAUSED)
    if kind is EventKind.RESUMED:
        return Decision(State.RUNNING)
    if kind is EventKind.RESTARTED:
        return Decision(State.RUNNING, "rebooted", restarted=True, clear_reboot=True)
    if kind is EventKind.POWERED_OFF:
        if reboot_pending:  # `reboot`: it shut down on our request; power it on again
            return Decision(action=Action.RESTART, reason="rebooted on request",
                            clear_reboot=True)
        if event.handled:  # xl kept it (on_poweroff=preserve); otherwise GONE follows
            return Decision(State.SHUTDOWN, "guest powered off")
        return _apply(on_poweroff, "guest powered off")
    if kind is EventKind.RESET_REQUESTED:
        if reboot_pending:
            return Decision(action=Action.RESTART, reason="rebooted on request",
                            clear_reboot=True)
        return _apply(on_reboot, "guest rebooted")
    if kind is EventKind.CRASHED:
        if event.handled:
            return Decision(State.CRASHED, "guest crashed", clear_reboot=True)
        return _apply(on_crash, "guest crashed", crash=True)
    if kind is EventKind.GONE:
        return Decision(forget=True, reason="removed by the hypervisor")
    if kind is EventKind.EXITED:
        return Decision(State.LOST, "its hypervisor process exited unexpectedly",
                        unplumb=True)
    return IGNORE


def _apply(action: Action, why: str, crash: bool = False) -> Decision:
    if action is Action.PRESERVE:
        return Decision(State.CRASHED if crash else State.SHUTDOWN, why)
    return Decision(action=action, reason=why, crash=crash)


def restarts(action: Action) -> bool:
    """restart, rename-restart, coredump-restart, soft-reset: the domain runs again."""
    return action not in (Action.DESTROY, Action.COREDUMP_DESTROY, Action.PRESERVE)


# ---- which verbs each state admits (as xm/xl) -------------------------------------------
LIVE = frozenset((State.RUNNING, State.BLOCKED, State.PAUSED))
_ALL_BUT_DYING = frozenset(s for s in State if s is not State.DYING)
RUNNING = frozenset((State.RUNNING, State.BLOCKED))

ADMITS: dict[str, frozenset[State]] = {
    "pause": RUNNING,
    "unpause": frozenset((State.PAUSED,)),
    "shutdown": LIVE,
    "reboot": LIVE,
    # a dying copy too: its destroy failed, the agent retries it, and so may its user
    "destroy": frozenset(State),
    "save": LIVE,
    "migrate": LIVE,
    "mem-set": LIVE,
    "mem-max": LIVE,
    "vcpu-set": LIVE,
    "block-attach": LIVE,
    "network-attach": LIVE,
    # a hot-unplug needs the guest's cooperation (ACPI eject, xen frontend)
    "block-detach": RUNNING,
    "network-detach": RUNNING,
    "console": _ALL_BUT_DYING - {State.LOST},
    # xm's other verbs (agent/cpus.py, agent/diag.py)
    "vcpu-list": LIVE,
    "vcpu-pin": LIVE,
    "sched-credit": LIVE,
    "dump-core": LIVE | frozenset(_PRESERVED),  # a crashed domain kept by on_crash=preserve, too
    "sysrq": RUNNING,  # the guest itself reads it
    "trigger": LIVE,
    "rename": _ALL_BUT_DYING,
}

_WORDS = {State.RUNNING: "running", State.BLOCKED: "running", State.PAUSED: "paused",
          State.SHUTDOWN: "shut down", State.CRASHED: "crashed", State.DYING: "dying",
          State.LOST: "lost (its hypervisor process is gone)"}


def _needs(states: frozenset[State]) -> str:
    if states == RUNNING:
        return "a running domain"
    if states == LIVE:
        return "a running or paused domain"
    if states == frozenset((State.PAUSED,)):
        return "a paused domain"
    if states == LIVE | frozenset(_PRESERVED):
        return "a domain whose hypervisor process is there (running, paused, shut down " \
            "or crashed)"
    return "another state"


def check(verb: str, state: State, name: str) -> None:
    """Refuse ``verb`` on a domain in ``state`` in one line naming the state."""
    admitted = ADMITS.get(verb)
    if admitted is None or state in admitted:
        return
    letter = state.letters.strip("-") or "-"
    hint = ""
    if state in _PRESERVED or state is State.LOST:
        hint = "; destroy it to clear it"
    elif state is State.DYING:
        hint = "; its destroy failed and is retried (destroy tries it again now)"
    elif verb in ("block-detach", "network-detach") and state is State.PAUSED:
        hint = "; unpause it first"
    raise ConflictError(f"{name} is {_WORDS[state]} ({letter}): {verb} needs "
                        f"{_needs(admitted)}{hint}", domain=name, state=state.value,
                        verb=verb)
