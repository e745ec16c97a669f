"""The demo's purchase intents: a realistic mix, a few bound to fail.

Numbered seats at the opera (session 1001), the venue's pick at a festival
(session 1002), and some that mix both. Every twentieth intent also asks for a
front-row seat of the chamber recital (session 1003) that the box office sold
before the demo began, so it fails with ``ORDER_SEAT_NOT_AVAILABLE`` and the
other seats in its basket are released.
"""

from __future__ import annotations

import uuid
from typing import Any

from fulfilment.onebox.client import OneboxClient
from schemas.intent import Buyer, SeatRef

OPERA, FESTIVAL, RECITAL = 1001, 1002, 1003
#: The recital's front row (seat ids 1-4), sold before the demo's intents run.
SOLD_OUT_SEATS = (1, 2, 3, 4)
#: Opera seats the demo hands out start here and run on, two or one per intent.
FIRST_OPERA_SEAT = 101


def demo_intents(count: int, batch: str | None = None) -> list[dict[str, Any]]:
    """``count`` valid intent documents with unique references."""
    batch = batch or f"demo-{uuid.uuid4().hex[:8]}"
    next_seat = FIRST_OPERA_SEAT
    intents = []
    for index in range(count):
        items: list[dict[str, Any]] = []
        kind = index % 3
        if kind == 0:
            items.append({"seats": [{"id": next_seat, "session_id": OPERA},
                                    {"id": next_seat + 1, "session_id": OPERA}]})
            next_seat += 2
        elif kind == 1:
            items.append({"session_id": FESTIVAL, "price_type_id": 3,
                          "quantity": 1 + index % 4})
        else:
            items.append({"session_id": FESTIVAL, "price_type_id": 4, "quantity": 1, "rate_id": 1})
            items.append({"seats": [{"id": next_seat, "session_id": OPERA, "rate_id": 2}]})
            next_seat += 1
        if index % 20 == 19:
            sold = SOLD_OUT_SEATS[index // 20 % 4]
            items.append({"seats": [{"id": sold, "session_id": RECITAL}]})
        intents.append({
            "reference": f"{batch}-{index:05d}",
            "batch": batch,
            "items": items,
            "buyer": {"email": f"buyer{index}@example.com", "name": "Demo",
                      "surname": f"Buyer {index}"},
            "metadata": {"demo_index": index},
        })
    return intents


def sell_out_recital_front_row(client: OneboxClient, reference: str) -> str:
    """Buy the recital's front row at the box office, so the demo's later asks fail."""
    order = client.create_order()
    client.add_seats(order.id, [SeatRef(id=seat, session_id=RECITAL) for seat in SOLD_OUT_SEATS])
    client.set_buyer(order.id, Buyer(email="box-office@example.com"))
    code = client.pre_confirm(order.id).code
    assert code is not None
    client.confirm(order.id, reference)
    return code
