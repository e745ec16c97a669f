"""Redis answers bytes or str depending on how the client was made; we want str."""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    """A Redis reply as text (clients without ``decode_responses`` give bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
