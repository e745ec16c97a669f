"""Reference tasks for bench/chain_hops.py: a broker hop with no work, and with one POST.

``bench.post`` is the bare chain the product is measured against: each task
makes one POST to the sandbox (a new basket) with a plain ``requests`` session
and a token fetched once per process; no ledger, no lease, no retries.
"""

from __future__ import annotations

import os
import threading

import requests

from tasks.app import app

_local = threading.local()


def _session() -> tuple[requests.Session, str]:
    if not hasattr(_local, "session"):
        session = requests.Session()
        answer = session.post(f"{os.environ['ONEBOX_API_URL']}/oauth/token", timeout=10, data={
            "grant_type": "client_credentials", "channel_id": os.environ["ONEBOX_CHANNEL_ID"],
            "client_id": "seller-channel-client", "client_secret": os.environ["ONEBOX_API_KEY"]})
        answer.raise_for_status()
        _local.session, _local.token = session, answer.json()["access_token"]
    return _local.session, _local.token


@app.task(name="bench.noop", acks_late=True)
def noop(value: str) -> str:
    return value


@app.task(name="bench.post", acks_late=True)
def post(value: str) -> str:
    session, token = _session()
    answer = session.post(f"{os.environ['ONEBOX_API_URL']}/distribution-api/v1/orders", json={},
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
    answer.raise_for_status()
    return value
