"""The ownership table: every move is in one place, and no path from an assignable
state reaches the host except through make-unassignable."""

from __future__ import annotations

import pytest

from pciguard.errors import IllegalTransition
from pciguard.model.ownership import TRANSITIONS, Event, State, allowed_events, next_state


def reachable_without(start: State, forbidden: Event) -> set[State]:
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (s, e), nxt in TRANSITIONS.items():
            if s is state and e is not forbidden and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("state", [s for s in State if s.assignable])
def test_assignable_devices_reach_the_host_only_through_make_unassignable(state: State) -> None:
    assert State.HOST not in reachable_without(state, Event.MAKE_UNASSIGNABLE)


@pytest.mark.parametrize("state", [s for s in State if s.in_flight])
def test_every_in_flight_state_can_finish_or_fail(state: State) -> None:
    events = set(allowed_events(state))
    assert Event.COMMIT in events and Event.ROLLBACK_FAILED in events


def test_rollback_of_an_assignment_ends_in_quarantine() -> None:
    assert next_state("d", State.ASSIGNING, Event.ROLLBACK) is State.QUARANTINED


def test_illegal_move_names_device_state_and_what_is_allowed() -> None:
    with pytest.raises(IllegalTransition) as caught:
        next_state("0000:03:00.0", State.HOST, Event.ASSIGN)
    message = str(caught.value)
    assert "0000:03:00.0 is host" in message and "make-assignable" in message
