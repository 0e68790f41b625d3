"""The ownership state machine: every move a device can make, in one table.

    PENDING ─admit─▶ ADMITTING ─commit─▶ HOST        (hot-plug, policy allows)
    PENDING ─quarantine─▶ QUARANTINED                 (hot-plug, the default)
    PENDING ─reject─▶ REMOVED
    HOST ─make-assignable─▶ QUARANTINING ─commit─▶ QUARANTINED   (rollback: HOST)
    QUARANTINED ─assign─▶ ASSIGNING ─commit─▶ ASSIGNED           (rollback: QUARANTINED)
    ASSIGNED ─release─▶ RELEASING ─commit─▶ QUARANTINED          (never back to ASSIGNED)
    QUARANTINED ─make-unassignable─▶ UNQUARANTINING ─commit─▶ HOST
    any in-flight state ─rollback-failed─▶ BROKEN ─release─▶ RELEASING   (recovering it)
    HOST ─adopt─▶ QUARANTINED ─adopt-assigned─▶ ASSIGNED   (found so on a host at start)
    HOST, QUARANTINED, ASSIGNED ─interrupted─▶ BROKEN      (an operation on it was killed)

A device marked assignable moves only between quarantine and guests; only
``make-unassignable`` (which resets it first) returns it to the host.
"""

from __future__ import annotations

from enum import StrEnum

from pciguard.errors import IllegalTransition


class State(StrEnum):
    PENDING = "pending"  # hot-plugged, policy not applied yet: DMA blocked
    ADMITTING = "admitting"  # the policy allowed it; on its way to a host driver
    HOST = "host"
    QUARANTINING = "quarantining"
    QUARANTINED = "quarantined"
    UNQUARANTINING = "unquarantining"
    ASSIGNING = "assigning"
    ASSIGNED = "assigned"
    RELEASING = "releasing"
    BROKEN = "broken"  # an unwind failed; held away from the host until released again
    REMOVED = "removed"

    @property
    def in_flight(self) -> bool:
        return self in _IN_FLIGHT

    @property
    def assignable(self) -> bool:
        """The device is marked assignable: it must never be owned by the host."""
        return self not in (
            State.PENDING,
            State.ADMITTING,
            State.HOST,
            State.REMOVED,
            State.QUARANTINING,
            State.UNQUARANTINING,
        )


class Event(StrEnum):
    ADMIT = "admit"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    MAKE_ASSIGNABLE = "make-assignable"
    MAKE_UNASSIGNABLE = "make-unassignable"
    ASSIGN = "assign"
    RELEASE = "release"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    ROLLBACK_FAILED = "rollback-failed"
    UNPLUG = "unplug"
    ADOPT = "adopt"  # found held away from the host (bound to a quarantine driver) at start
    ADOPT_ASSIGNED = "adopt-assigned"  # ... and, as the journal says, handed to a VM
    INTERRUPTED = "interrupted"  # an operation on it was killed half-way: what it did is unknown


_IN_FLIGHT = {
    State.ADMITTING,
    State.QUARANTINING,
    State.UNQUARANTINING,
    State.ASSIGNING,
    State.RELEASING,
}

S, E = State, Event

#: (state, event) -> next state. Nothing else is allowed.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.PENDING, E.ADMIT): S.ADMITTING,
    (S.ADMITTING, E.COMMIT): S.HOST,
    (S.ADMITTING, E.ROLLBACK): S.PENDING,
    (S.PENDING, E.QUARANTINE): S.QUARANTINED,
    (S.PENDING, E.REJECT): S.REMOVED,
    (S.HOST, E.MAKE_ASSIGNABLE): S.QUARANTINING,
    (S.QUARANTINING, E.COMMIT): S.QUARANTINED,
    (S.QUARANTINING, E.ROLLBACK): S.HOST,
    (S.QUARANTINED, E.MAKE_UNASSIGNABLE): S.UNQUARANTINING,
    (S.UNQUARANTINING, E.COMMIT): S.HOST,
    (S.UNQUARANTINING, E.ROLLBACK): S.QUARANTINED,
    (S.QUARANTINED, E.ASSIGN): S.ASSIGNING,
    (S.ASSIGNING, E.COMMIT): S.ASSIGNED,
    (S.ASSIGNING, E.ROLLBACK): S.QUARANTINED,
    (S.ASSIGNED, E.RELEASE): S.RELEASING,
    (S.RELEASING, E.COMMIT): S.QUARANTINED,
    (S.BROKEN, E.RELEASE): S.RELEASING,
    (S.HOST, E.ADOPT): S.QUARANTINED,
    (S.QUARANTINED, E.ADOPT_ASSIGNED): S.ASSIGNED,
    **{(s, E.INTERRUPTED): S.BROKEN for s in (S.HOST, S.QUARANTINED, S.ASSIGNED)},
    **{(s, E.ROLLBACK_FAILED): S.BROKEN for s in _IN_FLIGHT},
    **{(s, E.UNPLUG): S.REMOVED for s in (S.PENDING, S.HOST, S.QUARANTINED, S.BROKEN)},
    # Removing a rejected bridge removes everything below it, whatever policy said of it.
    **{(s, E.REJECT): S.REMOVED for s in (S.HOST, S.QUARANTINED, S.BROKEN)},
}


def allowed_events(state: State) -> list[Event]:
    return [e for (s, e) in TRANSITIONS if s is state]


def next_state(device: str, state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(
            device, state.value, event.value, [e.value for e in allowed_events(state)]
        ) from None
