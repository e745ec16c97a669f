"""The purchase table (``fulfilment.states``) is whole, and docs/design.md shows it as it is.

The walk of every pair against the sandbox is
``tests/integration/test_purchase_table.py``; this is what needs no service.
"""

from __future__ import annotations

from fulfilment import states
from fulfilment.states import FINAL, TABLE, Event, State
from tests.docs import doc


def test_every_state_meets_every_event_once() -> None:
    assert set(TABLE) == {(state, event) for state in State for event in Event}
    assert len(TABLE) == len(State) * len(Event)
    assert all(step.does for step in TABLE.values())


def test_an_outcome_only_answers_the_shop_and_the_unsettled_one_is_settled() -> None:
    for state in FINAL:
        for event in Event:
            then = TABLE[(state, event)].then
            if event in {Event.CANCEL, Event.CONFIRM}:
                assert then is state, (state, event)
            elif state is State.UNSETTLED and event is Event.DONE:
                assert then is State.CONFIRMED
            elif state is State.UNSETTLED and event is Event.REJECTED:
                assert then is State.FAILED
            else:
                assert then is None, (state, event)


def test_every_state_but_the_outcomes_leads_to_one() -> None:
    reached = set(FINAL)
    changed = True
    while changed:
        changed = False
        for (state, _), step in TABLE.items():
            if state not in reached and step.then in reached:
                reached.add(state)
                changed = True
    assert reached == set(State)


def test_the_design_page_shows_the_table_as_it_is() -> None:
    table = states.markdown()
    assert table in doc("design.md"), (
        "docs/design.md does not show fulfilment.states.markdown() as it is now; paste "
        "its output (python -c 'from fulfilment import states; print(states.markdown())')")
