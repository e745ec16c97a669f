"""The purchase as a table: its states, what moves each one, and where to.

One place a reader sees whole. ``state_of`` names where a ledger entry
stands; ``TABLE`` says, for every state and every event, what happens and
which state follows. The flow (``fulfilment.flow``) does the calls; the stops
(``fulfilment.stops``) answer a shop's cancel and confirm by this table;
``tests/integration/test_purchase_table.py`` walks every pair against a real
Redis and the sandbox and checks that the flow ends where the table says,
with one outcome, nothing bought twice and no seat left held.

Two rules hold the table together:

- **Nothing is bought after a stop.** A cancel (or a hold that lapses) is
  recorded only while no confirm was sent, and a confirm is marked sent only
  while no stop is recorded: both in one Redis script each, on the same entry,
  so one of them wins and the other is refused.
- **One outcome.** Every way out (confirmed, failed, unsettled, cancelled,
  expired) writes the outcome once (``Ledger.finish``); the held result is
  interim, and the final one follows with the same ``result_id``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.result import CANCELLED, CONFIRMED, EXPIRED, FAILED, UNSETTLED

if TYPE_CHECKING:
    from fulfilment.ledger import Entry


class State(enum.Enum):
    """Where a purchase stands, as its ledger entry says."""

    ADMITTED = "admitted"  # no basket: queued, waiting its turn (bulk), or between baskets
    BASKET = "basket"  # a basket is open: seats and buyer being added, or all added
    CALL_UNANSWERED = "call unanswered"  # a basket call went out and its answer was lost
    PRE_CONFIRMED = "pre-confirmed"  # the order has its code; no confirm sent
    HELD = "held"  # pre-confirmed and held for the shop: it waits for confirm or cancel
    CONFIRM_SENT = "confirm sent"  # a confirm may have reached Onebox: maybe bought
    STOPPING = "stopping"  # a cancel (or a lapsed hold) is recorded: seats being released
    CONFIRMED = CONFIRMED
    FAILED = FAILED
    UNSETTLED = UNSETTLED  # an outcome, but settled later (same result_id)
    CANCELLED = CANCELLED
    EXPIRED = EXPIRED

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({State.CONFIRMED, State.FAILED, State.UNSETTLED, State.CANCELLED,
                   State.EXPIRED})


class Event(enum.Enum):
    """What can happen to a purchase: an answer from Onebox, time passing, or the shop."""

    DONE = "the call is answered: done"
    REFUSED = "the call is refused for now (429, 503, auth): not done"
    REJECTED = "the call is refused for good (a 4xx that another try cannot change)"
    LOST = "the call's answer is lost (timeout, dropped connection): maybe done"
    GONE = "Onebox no longer knows the order (basket expired)"
    DEADLINE = "the intent's retry deadline passes"
    CANCEL = "the shop cancels"
    CONFIRM = "the shop confirms a hold"
    LAPSE = "the hold's time passes unconfirmed"


@dataclass(frozen=True)
class Move:
    """What an event does in a state: the state that follows, and what is done on the way.

    ``then`` None: the event cannot happen in this state (no call is made in
    it, or nothing is held); the flow never meets it.
    """

    then: State | None
    does: str

    @property
    def possible(self) -> bool:
        return self.then is not None


def _no(why: str) -> Move:
    return Move(None, why)


_NO_CALL = "no call is made in this state"
_STAYS = "nothing changes; the answer names the outcome that stands"
_S = State

#: Every state against every event. Read a row: what each event does to that state.
TABLE: dict[tuple[State, Event], Move] = {
    # --- no basket -------------------------------------------------------------------------
    (_S.ADMITTED, Event.DONE): Move(_S.BASKET, "create the order: a basket opens"),
    (_S.ADMITTED, Event.REFUSED): Move(_S.ADMITTED, "retry after a backoff"),
    (_S.ADMITTED, Event.REJECTED): Move(_S.FAILED, "failed: nothing was bought, nothing held"),
    (_S.ADMITTED, Event.LOST): Move(_S.ADMITTED, "create again: a basket we never heard of "
                                                 "is empty and expires by itself"),
    (_S.ADMITTED, Event.GONE): _no(_NO_CALL + " about an existing order"),
    (_S.ADMITTED, Event.DEADLINE): Move(_S.FAILED, "failed (retryable): nothing held"),
    (_S.ADMITTED, Event.CANCEL): Move(_S.CANCELLED, "cancelled at once: no basket to release"),
    (_S.ADMITTED, Event.CONFIRM): Move(_S.ADMITTED, "a hold: noted, it will not stop at "
                                                    "pre-confirm; not a hold: refused"),
    (_S.ADMITTED, Event.LAPSE): _no("nothing is held"),
    # --- basket open ------------------------------------------------------------------------
    (_S.BASKET, Event.DONE): Move(_S.PRE_CONFIRMED, "add the seats, then the buyer, then "
                                                    "pre-confirm: the order code is recorded"),
    (_S.BASKET, Event.REFUSED): Move(_S.BASKET, "retry the same call after a backoff"),
    (_S.BASKET, Event.REJECTED): Move(_S.FAILED, "failed; the basket's seats are released"),
    (_S.BASKET, Event.LOST): Move(_S.CALL_UNANSWERED, "the call is marked sent before it goes "
                                                      "out: its answer is owed"),
    (_S.BASKET, Event.GONE): Move(_S.ADMITTED, "the basket expired: start a new one"),
    (_S.BASKET, Event.DEADLINE): Move(_S.FAILED, "failed; the basket's seats are released"),
    (_S.BASKET, Event.CANCEL): Move(_S.STOPPING, "the stop is recorded; the worker releases "
                                                 "the basket at its next step"),
    (_S.BASKET, Event.CONFIRM): Move(_S.BASKET, "a hold: noted, it will not stop at "
                                                "pre-confirm; not a hold: refused"),
    (_S.BASKET, Event.LAPSE): _no("nothing is held yet"),
    # --- a basket call of unknown outcome -------------------------------------------------------
    (_S.CALL_UNANSWERED, Event.DONE): Move(_S.ADMITTED, "the basket is listed, released and "
                                                        "abandoned; a new one starts"),
    (_S.CALL_UNANSWERED, Event.REFUSED): Move(_S.ADMITTED, "abandoned all the same: its "
                                                           "seats are waited out"),
    (_S.CALL_UNANSWERED, Event.REJECTED): Move(_S.ADMITTED, "abandoned all the same: its "
                                                            "seats are waited out"),
    (_S.CALL_UNANSWERED, Event.LOST): Move(_S.ADMITTED, "abandoned all the same: its seats "
                                                        "are waited out"),
    (_S.CALL_UNANSWERED, Event.GONE): Move(_S.ADMITTED, "nothing left to release: a new "
                                                        "basket starts"),
    (_S.CALL_UNANSWERED, Event.DEADLINE): Move(_S.FAILED, "failed; what the basket may hold "
                                                          "is released"),
    (_S.CALL_UNANSWERED, Event.CANCEL): Move(_S.STOPPING, "the stop is recorded; the worker "
                                                          "lists and releases the basket"),
    (_S.CALL_UNANSWERED, Event.CONFIRM): Move(_S.CALL_UNANSWERED, "as in BASKET"),
    (_S.CALL_UNANSWERED, Event.LAPSE): _no("nothing is held yet"),
    # --- pre-confirmed ------------------------------------------------------------------------
    (_S.PRE_CONFIRMED, Event.DONE): Move(_S.CONFIRMED, "confirm (marked sent as it goes "
                                                       "out): the order is bought"),
    (_S.PRE_CONFIRMED, Event.REFUSED): Move(_S.PRE_CONFIRMED, "the confirm did nothing: "
                                                              "retry after a backoff"),
    (_S.PRE_CONFIRMED, Event.REJECTED): Move(_S.FAILED, "failed; the order's seats are "
                                                        "released"),
    (_S.PRE_CONFIRMED, Event.LOST): Move(_S.CONFIRM_SENT, "maybe bought: the order is read "
                                                          "before anything else"),
    (_S.PRE_CONFIRMED, Event.GONE): Move(_S.ADMITTED, "the order expired unconfirmed: a new "
                                                      "basket starts"),
    (_S.PRE_CONFIRMED, Event.DEADLINE): Move(_S.FAILED, "failed; the order's seats are "
                                                        "released"),
    (_S.PRE_CONFIRMED, Event.CANCEL): Move(_S.STOPPING, "the stop is recorded before any "
                                                        "confirm: none can be sent now"),
    (_S.PRE_CONFIRMED, Event.CONFIRM): Move(_S.PRE_CONFIRMED, "a hold: noted, it goes on to "
                                                              "confirm; not a hold: refused"),
    (_S.PRE_CONFIRMED, Event.LAPSE): _no("not held: a hold is recorded as HELD"),
    # --- held for the shop ---------------------------------------------------------------------
    (_S.HELD, Event.DONE): _no(_NO_CALL + ": it waits for the shop"),
    (_S.HELD, Event.REFUSED): _no(_NO_CALL),
    (_S.HELD, Event.REJECTED): _no(_NO_CALL),
    (_S.HELD, Event.LOST): _no(_NO_CALL),
    (_S.HELD, Event.GONE): _no(_NO_CALL + " (it lapses before Onebox's basket expires)"),
    (_S.HELD, Event.DEADLINE): _no("the hold's own time counts, not the retry deadline"),
    (_S.HELD, Event.CANCEL): Move(_S.STOPPING, "the stop is recorded; the order's seats are "
                                               "released: cancelled"),
    (_S.HELD, Event.CONFIRM): Move(_S.PRE_CONFIRMED, "the shop's confirm is recorded; the "
                                                     "confirm is sent"),
    (_S.HELD, Event.LAPSE): Move(_S.STOPPING, "the stop is recorded; the order's seats are "
                                              "released: expired"),
    # --- a confirm may have landed ---------------------------------------------------------------
    (_S.CONFIRM_SENT, Event.DONE): Move(_S.CONFIRMED, "the order reads CONFIRM (or the confirm "
                                                      "answered): bought"),
    (_S.CONFIRM_SENT, Event.REFUSED): Move(_S.CONFIRM_SENT, "read again later; never confirm "
                                                            "blind"),
    (_S.CONFIRM_SENT, Event.REJECTED): Move(_S.ADMITTED, "read unconfirmed (BASKET, EXPIRED, or "
                                                         "fenced): a new basket starts"),
    (_S.CONFIRM_SENT, Event.LOST): Move(_S.CONFIRM_SENT, "read again later; never confirm "
                                                         "blind"),
    (_S.CONFIRM_SENT, Event.GONE): Move(_S.CONFIRM_SENT, "a 404 proves nothing: fence (release "
                                                         "by id), or wait out the expiry"),
    (_S.CONFIRM_SENT, Event.DEADLINE): Move(_S.UNSETTLED, "Onebox cannot tell: unsettled, "
                                                          "settled later with the same "
                                                          "result_id"),
    (_S.CONFIRM_SENT, Event.CANCEL): Move(_S.CONFIRM_SENT, "refused: too late, confirm was "
                                                           "sent; nothing changes"),
    (_S.CONFIRM_SENT, Event.CONFIRM): Move(_S.CONFIRM_SENT, "nothing to do: it is confirming"),
    (_S.CONFIRM_SENT, Event.LAPSE): _no("a confirm was sent: nothing is held for the shop"),
    # --- a stop recorded -------------------------------------------------------------------------
    (_S.STOPPING, Event.DONE): Move(_S.CANCELLED, "the seats are released: cancelled (or "
                                                  "expired, for a lapsed hold)"),
    (_S.STOPPING, Event.REFUSED): Move(_S.STOPPING, "the release is tried again, a few times; "
                                                    "then the basket is left to expire"),
    (_S.STOPPING, Event.REJECTED): Move(_S.CANCELLED, "Onebox will not release it: "
                                                      "cancelled (or expired); what it still "
                                                      "holds is left to expire"),
    (_S.STOPPING, Event.LOST): Move(_S.STOPPING, "the release is tried again, a few times"),
    (_S.STOPPING, Event.GONE): Move(_S.CANCELLED, "the basket expired: nothing held, "
                                                  "cancelled (or expired)"),
    (_S.STOPPING, Event.DEADLINE): _no("a stop is an outcome already decided"),
    (_S.STOPPING, Event.CANCEL): Move(_S.STOPPING, "the same answer: cancel accepted"),
    (_S.STOPPING, Event.CONFIRM): Move(_S.STOPPING, "refused: cancelled (or the hold lapsed)"),
    (_S.STOPPING, Event.LAPSE): Move(_S.STOPPING, "the stop stands as recorded"),
}

# Outcomes: no call is made; the shop's requests are answered with the outcome that stands.
for _final in FINAL:
    for _event in Event:
        if _event in {Event.CANCEL, Event.CONFIRM}:
            TABLE[(_final, _event)] = Move(_final, _STAYS)
        else:
            TABLE[(_final, _event)] = _no("finished: " + _NO_CALL)
TABLE[(State.UNSETTLED, Event.DONE)] = Move(State.CONFIRMED, "settled: the order reads CONFIRM "
                                                            "(same result_id)")
TABLE[(State.UNSETTLED, Event.REJECTED)] = Move(State.FAILED, "settled: the order reads "
                                                              "unconfirmed (same result_id)")
TABLE[(State.UNSETTLED, Event.CANCEL)] = Move(State.UNSETTLED, "refused: too late, confirm "
                                                               "was sent")


def move(state: State, event: Event) -> Move:
    """What ``event`` does in ``state`` (every pair is in the table)."""
    return TABLE[(state, event)]


def state_of(entry: Entry) -> State:  # noqa: PLR0911 - one return per state
    """Where a ledger entry stands. The order of the tests is the table's precedence."""
    if entry.outcome is not None:
        return State(entry.outcome.status)
    if entry.stop:
        return State.STOPPING
    if entry.confirm_sent:
        return State.CONFIRM_SENT
    if entry.held_until is not None and not entry.confirm_requested:
        return State.HELD
    if entry.code is not None:
        return State.PRE_CONFIRMED
    if entry.pending is not None:
        return State.CALL_UNANSWERED
    if entry.order_id is not None:
        return State.BASKET
    return State.ADMITTED


def markdown() -> str:
    """The table as docs/design.md shows it (a test checks they agree)."""
    events = list(Event)
    lines = ["| state | " + " | ".join(e.name.lower() for e in events) + " |",
             "|---|" + "---|" * len(events)]
    for state in State:
        cells = []
        for event in events:
            step = TABLE[(state, event)]
            cells.append("—" if step.then is None else
                         ("stays" if step.then is state else step.then.value))
        lines.append(f"| **{state.value}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["FINAL", "TABLE", "Event", "Move", "State", "markdown", "move", "state_of"]
