"""What the sandbox can sell: sessions, venues, price types, rates and seats.

The catalogue is loaded once from a small JSON file (format in
``docs/sandbox.md``) and never changes while the sandbox runs. Numbered seats
are described by sectors of ``rows`` x ``seats_per_row`` rather than listed one
by one, so a 5,000-seat hall stays a few lines of JSON. Everything a response
repeats (the allocation of a seat, a rate) is built here once as a JSON-ready
dict and shared, because rendering orders is the sandbox's hot path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any


class CatalogueError(ValueError):
    """The catalogue file is malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class Rate:
    """A tariff (general, reduced, ...) that prices an item."""

    id: int
    name: str
    doc: dict[str, Any] = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class PriceType:
    """A zone of the venue, priced per rate (rate id -> price)."""

    id: int
    name: str
    prices: Mapping[int, float]


@dataclass(frozen=True, slots=True)
class Seat:
    """One numbered seat; ``allocation`` is its ready-made JSON allocation."""

    id: int
    name: str
    price_type_id: int
    allocation: dict[str, Any] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Session:
    """One performance: its seats, its not-numbered capacity and its prices."""

    id: int
    name: str
    currency: str
    rates: Mapping[int, Rate]
    default_rate_id: int
    price_types: Mapping[int, PriceType]
    #: Numbered seats by id, in ascending id order.
    seats: Mapping[int, Seat]
    #: Not-numbered capacity: price type id -> number of places.
    capacity: Mapping[int, int]
    #: Allocation JSON of a not-numbered place, per price type.
    capacity_allocations: Mapping[int, dict[str, Any]] = field(repr=False)
    #: Numbered seat ids per price type, ascending.
    seats_by_price_type: Mapping[int, tuple[int, ...]] = field(repr=False)


@dataclass(frozen=True, eq=False)
class Catalogue:
    """Every session the sandbox sells, by id."""

    sessions: Mapping[int, Session]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalogue:
        """Build a catalogue from its JSON form; raise ``CatalogueError`` if malformed."""
        try:
            return _build(data)
        except CatalogueError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CatalogueError(f"malformed catalogue: {exc!r}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Catalogue:
        """Read a catalogue JSON file."""
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as exc:
                raise CatalogueError(f"{path}: not JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def default(cls) -> Catalogue:
        """The bundled ``default_catalogue.json`` (built once, then shared)."""
        return _default()


@cache
def _default() -> Catalogue:
    text = resources.files(__package__).joinpath("default_catalogue.json").read_text("utf-8")
    return Catalogue.from_dict(json.loads(text))


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CatalogueError(f"{what} must be an integer, got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise CatalogueError(f"{what} must be a string, got {value!r}")
    return value


def _build(data: Mapping[str, Any]) -> Catalogue:
    currency = _str(data.get("currency", "EUR"), "currency")
    venues = {}
    for raw in data.get("venues", []):
        venue_id = _int(raw["id"], "venue id")
        venues[venue_id] = {
            "id": venue_id,
            "name": _str(raw["name"], "venue name"),
            "city": _str(raw.get("city", ""), "venue city"),
            "time_zone": _str(raw.get("time_zone", "UTC"), "venue time_zone"),
        }
    sessions: dict[int, Session] = {}
    for raw in data["sessions"]:
        session = _build_session(raw, venues, currency)
        if session.id in sessions:
            raise CatalogueError(f"session {session.id} is defined twice")
        sessions[session.id] = session
    return Catalogue(sessions=sessions)


def _build_session(
    raw: Mapping[str, Any], venues: Mapping[int, dict[str, Any]], currency: str
) -> Session:
    session_id = _int(raw["id"], "session id")
    where = f"session {session_id}"
    venue_id = _int(raw["venue_id"], f"{where}: venue_id")
    if venue_id not in venues:
        raise CatalogueError(f"{where}: unknown venue {venue_id}")
    name = _str(raw["name"], f"{where}: name")
    session_doc = {
        "id": session_id,
        "name": name,
        "date": {"start": _str(raw["start"], f"{where}: start"),
                 "end": _str(raw["end"], f"{where}: end")},
    }
    rates = _build_rates(raw, where)
    price_types = _build_price_types(raw, rates, where)

    def allocation(kind: str, price_type_id: int) -> dict[str, Any]:
        pt = price_types[price_type_id]
        return {"type": kind, "session": session_doc, "venue": venues[venue_id],
                "price_type": {"id": pt.id, "name": pt.name}}

    seats = _build_seats(raw, price_types, allocation, where)
    capacity: dict[int, int] = {}
    for key, places in raw.get("capacity", {}).items():
        price_type_id = int(key)
        if price_type_id not in price_types:
            raise CatalogueError(f"{where}: capacity of unknown price type {price_type_id}")
        if _int(places, f"{where}: capacity") < 0:
            raise CatalogueError(f"{where}: capacity must be >= 0")
        capacity[price_type_id] = places
    by_price_type: dict[int, list[int]] = {}
    for seat in seats.values():
        by_price_type.setdefault(seat.price_type_id, []).append(seat.id)
    return Session(
        id=session_id,
        name=name,
        currency=_str(raw.get("currency", currency), f"{where}: currency"),
        rates=rates,
        default_rate_id=next(iter(rates)),
        price_types=price_types,
        seats=seats,
        capacity=capacity,
        capacity_allocations={pt: allocation("NOT_NUMBERED", pt) for pt in capacity},
        seats_by_price_type={pt: tuple(ids) for pt, ids in by_price_type.items()},
    )


def _build_rates(raw: Mapping[str, Any], where: str) -> dict[int, Rate]:
    rates: dict[int, Rate] = {}
    for rate in raw.get("rates", [{"id": 1, "name": "General"}]):
        rate_id = _int(rate["id"], f"{where}: rate id")
        name = _str(rate["name"], f"{where}: rate name")
        rates[rate_id] = Rate(rate_id, name, {"id": rate_id, "name": name})
    if not rates:
        raise CatalogueError(f"{where}: needs at least one rate")
    return rates


def _build_price_types(
    raw: Mapping[str, Any], rates: Mapping[int, Rate], where: str
) -> dict[int, PriceType]:
    price_types: dict[int, PriceType] = {}
    for pt in raw["price_types"]:
        pt_id = _int(pt["id"], f"{where}: price type id")
        prices = {int(rate_id): float(price) for rate_id, price in pt["prices"].items()}
        for rate_id in prices:
            if rate_id not in rates:
                raise CatalogueError(f"{where}: price type {pt_id} prices unknown rate {rate_id}")
        if not prices:
            raise CatalogueError(f"{where}: price type {pt_id} has no price")
        price_types[pt_id] = PriceType(pt_id, _str(pt["name"], f"{where}: name"), prices)
    return price_types


def _build_seats(
    raw: Mapping[str, Any],
    price_types: Mapping[int, PriceType],
    allocation: Callable[[str, int], dict[str, Any]],
    where: str,
) -> dict[int, Seat]:
    """Expand sectors of rows x seats into seats; ids run on across sectors."""
    seats: dict[int, Seat] = {}
    next_seat_id = 1
    next_row_id = 1
    for sector in raw.get("sectors", []):
        sector_id = _int(sector["id"], f"{where}: sector id")
        price_type_id = _int(sector["price_type_id"], f"{where}: sector price_type_id")
        if price_type_id not in price_types:
            raise CatalogueError(f"{where}: sector {sector_id} has unknown price type")
        sector_doc = {"id": sector_id, "name": _str(sector["name"], f"{where}: sector name")}
        next_seat_id = _int(sector.get("first_seat_id", next_seat_id), f"{where}: first_seat_id")
        per_row = _int(sector["seats_per_row"], f"{where}: seats_per_row")
        for row_number in range(1, _int(sector["rows"], f"{where}: rows") + 1):
            row_doc = {"id": next_row_id, "name": str(row_number)}
            next_row_id += 1
            for number in range(1, per_row + 1):
                if next_seat_id in seats:
                    raise CatalogueError(f"{where}: seat id {next_seat_id} is used twice")
                doc = dict(allocation("NUMBERED", price_type_id))
                doc.update(sector=sector_doc, row=row_doc,
                           seat={"id": next_seat_id, "name": str(number)})
                seats[next_seat_id] = Seat(next_seat_id, str(number), price_type_id, doc)
                next_seat_id += 1
    return dict(sorted(seats.items()))
