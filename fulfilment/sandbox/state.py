"""Orders, holds, inventory and basket expiry: the sandbox's rules, without I/O.

Everything here runs in the event loop's thread, so there are no locks. The
clock is injected so the rules (expiry above all) can be tested without
waiting. Expiry is lazy but exact: every operation first drops the baskets
whose time is up, oldest touch first, so nobody can observe a basket that
should be gone. A basket's deadline is its last touch plus the *current*
``basket_ttl``; that keeps open orders sorted by deadline in touch order even
when the TTL is changed at run time, so the sweep stays O(expired).

Where the real API's behaviour is unknown, ``SandboxState.behaviour`` (a
``Behaviour``) picks the answer; the setter caches what the hot path tests, so
the defaults cost one attribute check per call.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fulfilment.sandbox.behaviour import DEFAULT, Behaviour
from fulfilment.sandbox.catalogue import Catalogue, Rate, Session

BASKET = "BASKET"
PRE_CONFIRM = "PRE_CONFIRM"
CONFIRM = "CONFIRM"
EXPIRED = "EXPIRED"
STATUSES = (BASKET, PRE_CONFIRM, CONFIRM)

#: An item's state once refunded (orders-management API).
REFUNDED = "REFUNDED"
#: The ``ob-action`` of a refund, as Onebox's webhooks name it.
REFUND_ACTION = "REFUND"

#: What a status check guards (see ``SandboxState.check_status``).
ADD, PRE_CONFIRM_CALL, CONFIRM_CALL, RELEASE = "add", "pre_confirm", "confirm", "release"

_CODE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class ApiError(Exception):
    """A refusal the API answers with ``{"code", "message"}`` and an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _unavailable(message: str) -> ApiError:
    return ApiError(409, "ORDER_SEAT_NOT_AVAILABLE", message)


def _invalid(message: str) -> ApiError:
    return ApiError(400, "DIST0005", message)


@dataclass(slots=True, eq=False)
class Item:
    """One seat or not-numbered place in an order; ``doc`` is its JSON form."""

    id: int
    session_id: int
    price_type_id: int
    seat_id: int | None
    price: float
    doc: dict[str, Any]
    #: How many places the item holds (more than 1 only with ``seats_auto_items=per_call``).
    places: int = 1
    #: The numbered seats it holds beyond ``seat_id`` (per-call seats-auto items).
    extra_seats: tuple[int, ...] = ()


@dataclass(slots=True, eq=False)
class Order:
    """An order and what it holds. ``touched`` is when a call last touched it."""

    id: str
    created: float
    touched: float
    status: str = BASKET
    code: str | None = None
    external_code: str | None = None
    items: dict[int, Item] = field(default_factory=dict)
    buyer: dict[str, Any] | None = None
    delivery_method: str | None = None
    payments: list[Any] | None = None
    currency: str = "EUR"
    #: (when, order document) after each change, kept only while the orders-management
    #: read lags (``orders_mgmt_lag_ms``); the read shows the newest one old enough.
    versions: list[tuple[float, dict[str, Any]]] | None = None
    #: Session id -> how many of its items this order holds while it is not final.
    per_session: dict[int, int] = field(default_factory=dict)


class SessionStock:
    """Who holds or bought each seat and place of one session.

    Free numbered seats sit in a min-heap per price type so seats-auto finds the
    lowest free ids without scanning sold ones; entries are checked when popped
    (a seat taken through ``/orders/seats`` stays in the heap until then).
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.held: dict[int, str] = {}
        self.sold: dict[int, str] = {}
        self._free = {pt: list(ids) for pt, ids in session.seats_by_price_type.items()}
        self.cap_held = dict.fromkeys(session.capacity, 0)
        self.cap_sold = dict.fromkeys(session.capacity, 0)

    def check_seats(self, seat_ids: Iterable[int]) -> None:
        """Raise 409 unless every seat exists and is free."""
        seats = self.session.seats
        for seat_id in seat_ids:
            if seat_id not in seats:
                raise _unavailable(f"seat {seat_id} does not exist in session {self.session.id}")
            if seat_id in self.held or seat_id in self.sold:
                raise _unavailable(f"seat {seat_id} of session {self.session.id} is not free")

    def hold_seats(self, order_id: str, seat_ids: Iterable[int]) -> None:
        """Hold seats already checked by ``check_seats``."""
        for seat_id in seat_ids:
            self.held[seat_id] = order_id

    def hold_auto(self, order_id: str, price_type_id: int, quantity: int) -> list[int | None]:
        """Hold ``quantity`` places of a price type, all or none; None = not numbered."""
        if price_type_id in self.session.capacity:
            free = (self.session.capacity[price_type_id] - self.cap_held[price_type_id]
                    - self.cap_sold[price_type_id])
            if free < quantity:
                raise _unavailable(f"only {free} places left of price type {price_type_id}")
            self.cap_held[price_type_id] += quantity
            return [None] * quantity
        heap = self._free.get(price_type_id, [])
        taken: list[int] = []
        while heap and len(taken) < quantity:
            seat_id = heapq.heappop(heap)
            if seat_id not in self.held and seat_id not in self.sold:
                self.held[seat_id] = order_id
                taken.append(seat_id)
        if len(taken) < quantity:
            for seat_id in taken:
                del self.held[seat_id]
                heapq.heappush(heap, seat_id)
            raise _unavailable(f"fewer than {quantity} seats left of price type {price_type_id}")
        return list[int | None](taken)

    def release(self, item: Item) -> None:
        """Give a held item's seats or places back."""
        if item.seat_id is None:
            self.cap_held[item.price_type_id] -= item.places
        else:
            free = self._free[item.price_type_id]
            self.held.pop(item.seat_id, None)
            heapq.heappush(free, item.seat_id)
            for seat_id in item.extra_seats:
                self.held.pop(seat_id, None)
                heapq.heappush(free, seat_id)

    def sell(self, item: Item, order_id: str) -> bool:
        """Turn a held item into a sale; False if one of its seats was already sold."""
        if item.seat_id is None:
            pt = item.price_type_id
            self.cap_held[pt] -= item.places
            self.cap_sold[pt] += item.places
            return self.cap_sold[pt] <= self.session.capacity[pt]
        if item.extra_seats:
            fresh = True
            for seat_id in (item.seat_id, *item.extra_seats):
                fresh &= self._sell_seat(seat_id, order_id)
            return fresh
        return self._sell_seat(item.seat_id, order_id)

    def _sell_seat(self, seat_id: int, order_id: str) -> bool:
        self.held.pop(seat_id, None)
        if seat_id in self.sold:
            return False
        self.sold[seat_id] = order_id
        return True

    def unsell(self, item: Item) -> None:
        """A refunded item: its seats or places go back on sale."""
        if item.seat_id is None:
            self.cap_sold[item.price_type_id] -= item.places
            return
        free = self._free[item.price_type_id]
        for seat_id in (item.seat_id, *item.extra_seats):
            self.sold.pop(seat_id, None)
            heapq.heappush(free, seat_id)

    def inventory(self) -> dict[str, Any]:
        """Every seat's state and every price type's place counts."""
        seats = {
            str(seat_id): "SOLD" if seat_id in self.sold else "HELD" if seat_id in self.held
            else "FREE"
            for seat_id in self.session.seats
        }
        capacity = {}
        for pt, total in self.session.capacity.items():
            held, sold = self.cap_held[pt], self.cap_sold[pt]
            capacity[str(pt)] = {"total": total, "free": total - held - sold,
                                 "held": held, "sold": sold}
        return {"seats": seats, "capacity": capacity}


class _IsoClock:
    """UTC ISO-8601 text per whole second, cached: formatting is not free."""

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}

    def __call__(self, timestamp: float) -> str:
        second = int(timestamp)
        text = self._cache.get(second)
        if text is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            self._cache[second] = text
        return text


class SandboxState:
    """All orders and inventory, with the rules of ``docs/sandbox.md``."""

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        basket_ttl: float = 600.0,
        max_items: int = 1000,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        behaviour: Behaviour = DEFAULT,
    ) -> None:
        self.catalogue = catalogue
        self.basket_ttl = basket_ttl
        self.max_items = max_items
        self._clock = clock
        self._rng = rng or random.Random()
        self._iso = _IsoClock()
        self._lag = 0.0
        #: Called with (order, action) after a change Onebox would send a webhook for
        #: (``REFUND_ACTION``). Wiring, not state: ``reset`` keeps them.
        self.listeners: list[Callable[[Order, str], None]] = []
        self.reset()
        self.behaviour = behaviour

    @property
    def behaviour(self) -> Behaviour:
        """The switches in force; setting them applies at once."""
        return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: Behaviour) -> None:
        self._behaviour = behaviour
        lag = behaviour.orders_mgmt_lag_ms / 1000.0
        if lag and not self._lag:
            # History starts now: what every coded order shows is already visible.
            for order in self._by_code.values():
                order.versions = [(-math.inf, self._snapshot(order))]
        elif not lag and self._lag:
            for order in self._by_code.values():
                order.versions = None
        self._lag = lag
        self._idempotent = behaviour.repeat_status_call == "idempotent"
        self._release_refuse = behaviour.release_outside_basket == "refuse"
        self._release_ignored = behaviour.release_outside_basket == "ignored"
        self._expired_readable = behaviour.expired_orders == "readable"
        self._reads_touch = behaviour.reads_touch
        self._per_call = behaviour.seats_auto_items == "per_call"
        self._merge_buyer = behaviour.buyer_data == "merge"
        self._change_pre_confirmed = behaviour.change_pre_confirmed == "to_basket"
        self._new_code = behaviour.code_after_basket == "new"
        self._ignore_unknown = behaviour.release_unknown_items == "ignore"
        self._confirmed_only = behaviour.orders_mgmt_scope == "confirmed"
        self._refund_again = behaviour.repeat_refund == "again"

    def reset(self) -> None:
        """Forget every order, hold and sale; keep the catalogue and settings."""
        self.orders: dict[str, Order] = {}
        self._by_code: dict[str, Order] = {}
        self._open: OrderedDict[str, Order] = OrderedDict()
        self._stock = {sid: SessionStock(s) for sid, s in self.catalogue.sessions.items()}
        self._next_item_id = 1
        self._expired = 0
        self._expired_docs: dict[str, dict[str, Any]] = {}
        self._confirmed_by_ref: dict[str, list[str]] = {}
        #: Order code -> when Onebox confirmed it (this sandbox's clock): a benchmark
        #: compares it with when a cancel was acknowledged.
        self._confirmed_at: dict[str, float] = {}
        self._confirmed_without_ref = 0
        self._sold_by_session: dict[int, int] = {}
        self._sold_twice = 0
        #: Non-final orders holding seats of each session, now and at most so far.
        self._open_by_session: dict[int, int] = {}
        self._peak_by_session: dict[int, int] = {}
        #: Refund calls that refunded something; item refunds by order code and item id.
        self._refunds = 0
        self._refunded: dict[str, dict[int, int]] = {}
        self._refund_conflicts = 0

    # -- lookup and expiry -------------------------------------------------

    def sweep(self) -> float:
        """Drop every basket whose time is up; return the time used."""
        now = self._clock()
        deadline = now - self.basket_ttl
        open_orders = self._open
        while open_orders:
            order = next(iter(open_orders.values()))
            if order.touched > deadline:
                break
            self._expire(order)
        return now

    def _expire(self, order: Order) -> None:
        if self._expired_readable and order.code is not None:
            doc = self._snapshot(order)
            doc["status"] = {"type": EXPIRED, "expires_in": None}
            for item in doc["items"]:
                item["state"] = "RELEASED"
            self._expired_docs[order.code] = doc
        del self._open[order.id]
        del self.orders[order.id]
        if order.code is not None:
            self._by_code.pop(order.code, None)
        for item in order.items.values():
            self._stock[item.session_id].release(item)
        self._final(order)
        self._expired += 1

    def create_order(self) -> Order:
        """A new, empty basket."""
        now = self.sweep()
        order_id = f"{self._rng.getrandbits(128):032x}"
        order = Order(order_id, created=now, touched=now)
        self.orders[order_id] = order
        self._open[order_id] = order
        return order

    def order(self, order_id: str, *, touch: bool = True) -> Order:
        """The order a distribution call names; with ``touch`` its expiry restarts."""
        now = self.sweep()
        order = self.orders.get(order_id)
        if order is None:
            raise ApiError(404, "ORDER_NOT_FOUND", f"order {order_id} not found")
        if touch and order.status != CONFIRM:
            order.touched = now
            self._open.move_to_end(order_id)
        return order

    def touch(self, order: Order) -> None:
        """Restart an open order's expiry (a no-op for a confirmed or expired one)."""
        if order.status != CONFIRM and order.id in self._open:
            order.touched = self._clock()
            self._open.move_to_end(order.id)

    def order_by_code(self, code: str) -> Order:
        """The live order with that code (reading does not touch it)."""
        self.sweep()
        order = self._by_code.get(code)
        if order is None:
            raise ApiError(404, "ORDER_NOT_FOUND", f"order {code} not found")
        return order

    def read_by_code(self, code: str) -> dict[str, Any]:
        """The order document the orders-management read answers, switches applied."""
        now = self.sweep()
        order = self._by_code.get(code)
        doc: dict[str, Any] | None
        if order is None:
            doc = self._expired_docs.get(code) if self._expired_readable else None
        else:
            if self._reads_touch:
                self.touch(order)
            doc = self._lagged(order, now) if self._lag else self.render(order)
        if doc is None or (self._confirmed_only and doc["status"]["type"] != CONFIRM):
            raise ApiError(404, "ORDER_NOT_FOUND", f"order {code} not found")
        return doc

    def _lagged(self, order: Order, now: float) -> dict[str, Any] | None:
        """What a read lagging ``orders_mgmt_lag_ms`` behind sees; None = not yet there.

        The first version of a coded order is the one its code appeared with (or, if it
        had its code before the lag was switched on, one that is already visible)."""
        cutoff = now - self._lag
        versions = order.versions
        if not versions:
            return self.render(order)
        while len(versions) > 1 and versions[1][0] <= cutoff:
            del versions[0]
        at, doc = versions[0]
        return doc if at <= cutoff else None

    def _snapshot(self, order: Order) -> dict[str, Any]:
        """The order document as it stands, safe from later changes."""
        doc = self.render(order)
        doc["items"] = [dict(item) for item in doc["items"]]
        doc["buyer_data"] = dict(doc["buyer_data"])
        return doc

    def _changed(self, order: Order) -> None:
        """Record a change the lagging read will show later (only while it lags)."""
        if order.code is None:
            return
        if order.versions is None:
            order.versions = []
        order.versions.append((self._clock(), self._snapshot(order)))

    def _back_to_basket(self, order: Order) -> None:
        order.status = BASKET
        if self._new_code and order.code is not None:
            del self._by_code[order.code]
            order.code = None
            order.versions = None

    # -- the purchase flow -------------------------------------------------

    def _session(self, session_id: int) -> Session:
        session = self.catalogue.sessions.get(session_id)
        if session is None:
            raise ApiError(404, "SESSION_NOT_FOUND", f"session {session_id} not found")
        return session

    def check_status(self, order: Order, call: str, action: str) -> None:
        """DIST0004 unless the order's status allows ``call`` (ADD, PRE_CONFIRM_CALL, ...)."""
        status = order.status
        if call == ADD:
            allowed = status == BASKET or (status == PRE_CONFIRM and self._change_pre_confirmed)
        elif call == PRE_CONFIRM_CALL:
            allowed = status == BASKET or (status == PRE_CONFIRM and self._idempotent)
        elif call == CONFIRM_CALL:
            allowed = status == PRE_CONFIRM or (status == CONFIRM and self._idempotent)
        else:
            allowed = status == BASKET or (status == PRE_CONFIRM and not self._release_refuse)
        if not allowed:
            raise ApiError(400, "DIST0004", f"cannot {action} an order in status {status}")

    def _check_room(self, order: Order, more: int) -> None:
        if len(order.items) + more > self.max_items:
            raise ApiError(400, "ORDER_ITEMS_LIMIT_EXCEEDED",
                           f"an order holds at most {self.max_items} items")

    @staticmethod
    def _rate(session: Session, price_type_id: int, rate_id: int | None) -> tuple[Rate, float]:
        rate_id = session.default_rate_id if rate_id is None else rate_id
        price = session.price_types[price_type_id].prices.get(rate_id)
        if price is None:
            raise _invalid(f"rate {rate_id} does not apply to price type {price_type_id}")
        return session.rates[rate_id], price

    def _add_item(self, order: Order, session: Session, *, price_type_id: int,
                  seat_id: int | None, rate: Rate, price: float) -> Item:
        item_id = self._next_item_id
        self._next_item_id += 1
        allocation = (session.seats[seat_id].allocation if seat_id is not None
                      else session.capacity_allocations[price_type_id])
        doc = {"id": item_id, "type": "SEAT", "state": "RESERVED", "allocation": allocation,
               "rate": rate.doc, "price": price}
        item = order.items[item_id] = Item(item_id, session.id, price_type_id, seat_id, price,
                                           doc)
        self._holds(order, session.id, 1)
        if len(order.items) == 1:
            order.currency = session.currency
        return item

    def _after_change(self, order: Order) -> None:
        """A PRE_CONFIRM order changed by an add goes back to BASKET; record the change."""
        if order.status == PRE_CONFIRM:
            self._back_to_basket(order)
        if self._lag:
            self._changed(order)

    def add_seats(self, order: Order, seats: Sequence[tuple[int, int, int | None]]) -> None:
        """Hold exact seats, given as (seat id, session id, rate id or None); all or none."""
        self.check_status(order, ADD, "add seats to")
        if not seats:
            raise _invalid("seats must not be empty")
        self._check_room(order, len(seats))
        wanted: dict[int, list[tuple[int, Rate, float, int]]] = {}
        seen: set[tuple[int, int]] = set()
        for seat_id, session_id, rate_id in seats:
            session = self._session(session_id)
            seat = session.seats.get(seat_id)
            if seat is None:
                raise _unavailable(f"seat {seat_id} does not exist in session {session_id}")
            rate, price = self._rate(session, seat.price_type_id, rate_id)
            if (session_id, seat_id) in seen:
                raise _invalid(f"seat {seat_id} is asked for twice")
            seen.add((session_id, seat_id))
            wanted.setdefault(session_id, []).append((seat_id, rate, price, seat.price_type_id))
        for session_id, asked in wanted.items():
            self._stock[session_id].check_seats(seat_id for seat_id, *_ in asked)
        for session_id, asked in wanted.items():
            self._stock[session_id].hold_seats(order.id, (seat_id for seat_id, *_ in asked))
            session = self.catalogue.sessions[session_id]
            for seat_id, rate, price, price_type_id in asked:
                self._add_item(order, session, price_type_id=price_type_id, seat_id=seat_id,
                               rate=rate, price=price)
        self._after_change(order)

    def add_seats_auto(self, order: Order, session_id: int, price_type_id: int,
                       quantity: int, rate_id: int | None = None) -> None:
        """Let the venue pick ``quantity`` places of a price type; all or none."""
        self.check_status(order, ADD, "add seats to")
        if quantity < 1:
            raise _invalid("quantity must be at least 1")
        per_call = self._per_call
        self._check_room(order, 1 if per_call else quantity)
        session = self._session(session_id)
        if price_type_id not in session.price_types:
            raise _invalid(f"price type {price_type_id} is not sold in session {session_id}")
        rate, price = self._rate(session, price_type_id, rate_id)
        taken = self._stock[session_id].hold_auto(order.id, price_type_id, quantity)
        if per_call:
            item = self._add_item(order, session, price_type_id=price_type_id,
                                  seat_id=taken[0], rate=rate,
                                  price=round(price * quantity, 2))
            item.places = quantity
            item.extra_seats = tuple(seat_id for seat_id in taken[1:] if seat_id is not None)
            item.doc["quantity"] = quantity
        else:
            for seat_id in taken:
                self._add_item(order, session, price_type_id=price_type_id, seat_id=seat_id,
                               rate=rate, price=price)
        self._after_change(order)

    def set_buyer(self, order: Order, buyer: Mapping[str, Any]) -> None:
        """Attach the buyer's data (replacing or merged into earlier data)."""
        self.check_status(order, ADD, "set the buyer of")
        if self._merge_buyer and order.buyer is not None:
            order.buyer = {**order.buyer, **buyer}
        else:
            order.buyer = dict(buyer)
        self._after_change(order)

    def pre_confirm(self, order: Order, delivery_method: str | None = None) -> None:
        """Move a complete basket to PRE_CONFIRM; it gets its code (kept from then on)."""
        self.check_status(order, PRE_CONFIRM_CALL, "pre-confirm")
        if order.status == PRE_CONFIRM:  # a repeat, answered as it stands
            return
        if not order.items:
            raise ApiError(400, "PARAMETER_REQUIRED", "the order has no items")
        if order.buyer is None:
            raise ApiError(400, "PARAMETER_REQUIRED", "the order has no buyer data")
        if order.code is None:
            code = self._new_code_for()
            order.code = code
            self._by_code[code] = order
        order.delivery_method = delivery_method
        order.status = PRE_CONFIRM
        if self._lag:
            self._changed(order)

    def _new_code_for(self) -> str:
        while True:
            code = "".join(self._rng.choices(_CODE_ALPHABET, k=12))
            if code not in self._by_code and code not in self._expired_docs:
                return code

    def confirm(self, order: Order, external_code: str | None = None,
                payments: list[Any] | None = None) -> None:
        """Sell what a PRE_CONFIRM order holds; the order is final from now on."""
        self.check_status(order, CONFIRM_CALL, "confirm")
        if order.status == CONFIRM:  # a repeat, answered as it stands
            return
        for item in order.items.values():
            if not self._stock[item.session_id].sell(item, order.id):
                self._sold_twice += 1
            item.doc["state"] = "SOLD"
            self._sold_by_session[item.session_id] = (
                self._sold_by_session.get(item.session_id, 0) + item.places)
        order.status = CONFIRM
        self._final(order)
        order.external_code = external_code
        order.payments = payments
        del self._open[order.id]
        assert order.code is not None
        self._confirmed_at[order.code] = self._clock()
        if external_code is None:
            self._confirmed_without_ref += 1
        else:
            self._confirmed_by_ref.setdefault(external_code, []).append(order.code)
        if self._lag:
            self._changed(order)

    def release(self, order: Order, item_ids: Sequence[int]) -> None:
        """Give items back, all or none; a PRE_CONFIRM order returns to BASKET."""
        if order.status == CONFIRM:
            raise ApiError(400, "DIST0004", "cannot release seats of a confirmed order")
        self.check_status(order, RELEASE, "release seats of")
        if order.status == PRE_CONFIRM and self._release_ignored:
            return  # answered 200, but it does not take: nothing released, still PRE_CONFIRM
        unknown = [item_id for item_id in item_ids if item_id not in order.items]
        if unknown:
            if not self._ignore_unknown:
                raise _invalid(f"items {unknown} are not in the order")
            item_ids = [item_id for item_id in item_ids if item_id in order.items]
            if not item_ids:  # nothing of this order named: nothing changes
                return
        for item_id in dict.fromkeys(item_ids):
            item = order.items.pop(item_id)
            self._stock[item.session_id].release(item)
            self._holds(order, item.session_id, -1)
        if order.status == PRE_CONFIRM:
            self._back_to_basket(order)
        if self._lag:
            self._changed(order)

    def refund(self, order: Order, item_ids: Sequence[int] | None) -> None:
        """Refund items of a confirmed order (None or empty: every item); all or none.

        A refunded item's seats go back on sale. Naming an item that is already
        REFUNDED is 409 ``PRODUCT_STATE_INVALID`` and refunds nothing, unless
        ``repeat_refund`` is ``again``: then it is refunded once more (the audit's
        ``refunded_twice``), as an API without that check would.
        """
        if order.status != CONFIRM:
            raise ApiError(409, "ORDER_STATE_INVALID",
                           f"cannot refund an order in status {order.status}")
        ids = list(dict.fromkeys(item_ids)) if item_ids else list(order.items)
        unknown = [item_id for item_id in ids if item_id not in order.items]
        if unknown:
            raise _invalid(f"items {unknown} are not in the order")
        done = [item_id for item_id in ids if order.items[item_id].doc["state"] == REFUNDED]
        if done and not self._refund_again:
            self._refund_conflicts += 1
            raise ApiError(409, "PRODUCT_STATE_INVALID", f"items {done} are already refunded")
        assert order.code is not None
        counts = self._refunded.setdefault(order.code, {})
        for item_id in ids:
            item = order.items[item_id]
            if item.doc["state"] != REFUNDED:
                self._stock[item.session_id].unsell(item)
                item.doc["state"] = REFUNDED
            counts[item_id] = counts.get(item_id, 0) + 1
        self._refunds += 1
        if self._lag:
            self._changed(order)
        for listener in list(self.listeners):
            listener(order, REFUND_ACTION)

    def _holds(self, order: Order, session_id: int, change: int) -> None:
        """Count ``change`` items of a session in a non-final order (the audit's
        ``open_orders_by_session`` and its peak: a session cap seen from Onebox's side)."""
        before = order.per_session.get(session_id, 0)
        after = order.per_session[session_id] = before + change
        if before == 0 and after > 0:
            count = self._open_by_session[session_id] = (
                self._open_by_session.get(session_id, 0) + 1)
            if count > self._peak_by_session.get(session_id, 0):
                self._peak_by_session[session_id] = count
        elif before > 0 and after == 0:
            self._open_by_session[session_id] -= 1
        if after == 0:
            del order.per_session[session_id]

    def _final(self, order: Order) -> None:
        """The order is confirmed or gone: it no longer counts as open in its sessions."""
        for session_id in order.per_session:
            self._open_by_session[session_id] -= 1
        order.per_session.clear()

    # -- views ---------------------------------------------------------------

    def render(self, order: Order) -> dict[str, Any]:
        """The order object as the API answers it."""
        if order.status == CONFIRM:
            expires_in = None
        else:
            deadline = order.touched + self.basket_ttl
            expires_in = {"value": max(0, math.ceil(deadline - self._clock())),
                          "time_unit": "SECONDS", "date": self._iso(deadline)}
        items = order.items.values()
        base = round(sum((item.price for item in items), 0.0), 2)
        return {
            "id": order.id,
            "code": order.code,
            "date": self._iso(order.created),
            "external_code": order.external_code,
            "type": "PURCHASE",
            "language_code": "en-US",
            "status": {"type": order.status, "expires_in": expires_in},
            "items": [item.doc for item in items],
            "buyer_data": order.buyer or {},
            "price": {"base": base, "promotions": [], "delivery": 0.0, "insurance": 0.0,
                      "surcharges": [], "final": base, "currency": order.currency},
        }

    def audit(self) -> dict[str, Any]:
        """Counts that let a test prove nothing was bought twice or lost."""
        self.sweep()
        orders = dict.fromkeys(STATUSES, 0)
        for order in self._open.values():
            orders[order.status] += 1
        orders[CONFIRM] = len(self.orders) - len(self._open)
        return {
            "orders": orders,
            "orders_expired": self._expired,
            "confirmed": {ref: list(codes) for ref, codes in self._confirmed_by_ref.items()},
            "confirmed_at": dict(self._confirmed_at),
            "duplicates": {ref: len(codes) for ref, codes in self._confirmed_by_ref.items()
                           if len(codes) > 1},
            "confirmed_without_external_code": self._confirmed_without_ref,
            "seats_sold": {str(sid): n for sid, n in self._sold_by_session.items()},
            "seats_sold_twice": self._sold_twice,
            "open_orders_by_session": {str(sid): n for sid, n in self._open_by_session.items()
                                       if n},
            "peak_open_orders_by_session": {str(sid): n
                                            for sid, n in self._peak_by_session.items()},
            "refunds": self._refunds,
            "refunded": {code: {str(item_id): n for item_id, n in items.items()}
                         for code, items in self._refunded.items()},
            "refunded_twice": sum(n - 1 for items in self._refunded.values()
                                  for n in items.values() if n > 1),
            "refund_conflicts": self._refund_conflicts,
        }

    def inventory(self, session_id: int) -> dict[str, Any]:
        """Seat states and place counts of one session."""
        self.sweep()
        self._session(session_id)
        return self._stock[session_id].inventory()
