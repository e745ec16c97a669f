"""The recovery sweep: the ledger, not the broker, is the record of what is owed.

An intent whose ledger entry has not moved for ``stuck_after`` seconds and has
no published outcome lost its message somewhere (a broker restart, a worker
killed past its visibility timeout, a chain that stalled, a producer that died
between admitting and dispatching). The sweep dispatches it again; the flow
resumes it from the ledger, and the lease keeps a late original from racing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fulfilment.flow import Services

log = logging.getLogger(__name__)


def sweep(services: Services, dispatch: Callable[[str], None], *, limit: int = 500) -> list[str]:
    """Dispatch every stuck intent again; return their references."""
    deadline = services.clock() - services.settings.stuck_after
    resumed = []
    for reference in services.ledger.stuck(deadline, limit=limit):
        try:
            entry = services.ledger.get(reference)
        except Exception as exc:
            log.exception("ledger entry of %s is unreadable; sent to the failures queue",
                          reference)
            services.publisher.publish_failure(f"unreadable ledger entry: {type(exc).__name__}",
                                               {"reference": [reference]}, None)
            services.ledger.forget_open(reference)
            continue
        if entry is None or entry.published:
            services.ledger.forget_open(reference)  # expired, or done meanwhile
            continue
        # Mark progress now, so the next sweep gives this dispatch time to work.
        services.ledger.record(reference)
        dispatch(reference)
        resumed.append(reference)
    if resumed:
        log.warning("recovery sweep resumed %d stuck intents", len(resumed))
    return resumed
