"""Intents for load: each buys one seat the venue picks, so any number can be confirmed."""

from __future__ import annotations

from typing import Any


def auto_seat_intents(tag: str, count: int) -> list[dict[str, Any]]:
    """``count`` intents, references ``<tag>-<n>``, one automatic seat each (session 1002)."""
    return [{"reference": f"{tag}-{i}", "buyer": {"email": "bench@example.com"},
             "items": [{"session_id": 1002, "price_type_id": 3, "quantity": 1}]}
            for i in range(count)]
