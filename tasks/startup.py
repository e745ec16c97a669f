"""Checks a worker makes before it takes any work."""

from __future__ import annotations

import sys
from typing import Any

from celery.signals import celeryd_after_setup

from fulfilment.errors import ConfigError
from tasks import runtime


@celeryd_after_setup.connect
def _require_durable_redis(**_: Any) -> None:
    """Exit with one line unless the ledger's Redis keeps what it acknowledged."""
    try:
        runtime.check_durable_once()
    except ConfigError as exc:
        print(f"fulfilment worker: {exc.message}", file=sys.stderr, flush=True)
        raise SystemExit(78) from None  # EX_CONFIG: a supervisor should not loop on it
