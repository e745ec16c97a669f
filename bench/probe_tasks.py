"""Reference tasks for bench/chain_hops.py: a broker hop with no work, and with one POST.

``bench.post`` is the bare chain the product is measured against: each task
makes one POST to the sandbox (a new basket) with a plain ``requests`` session
and a token fetched once per process; no ledger, no lease, no retries.
``bench.post_lean`` is the same with ``trust_env`` off (the environment is read
once, as the product's session does), a stricter reference.
"""

from __future__ import annotations

import os
import threading

import requests

from tasks.app import app

_local = threading.local()


def _session(lean: bool = False) -> tuple[requests.Session, str]:
    name = "lean" if lean else "plain"
    if not hasattr(_local, name):
        session = requests.Session()
        session.trust_env = not lean
        answer = session.post(f"{os.environ['ONEBOX_API_URL']}/oauth/token", timeout=10, data={
            "grant_type": "client_credentials", "channel_id": os.environ["ONEBOX_CHANNEL_ID"],
            "client_id": "seller-channel-client", "client_secret": os.environ["ONEBOX_API_KEY"]})
        answer.raise_for_status()
        setattr(_local, name, (session, answer.json()["access_token"]))
    found: tuple[requests.Session, str] = getattr(_local, name)
    return found


@app.task(name="bench.noop", acks_late=True)
def noop(value: str) -> str:
    return value


def _post(lean: bool) -> None:
    session, token = _session(lean)
    answer = session.post(f"{os.environ['ONEBOX_API_URL']}/distribution-api/v1/orders", json={},
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
    answer.raise_for_status()


@app.task(name="bench.post", acks_late=True)
def post(value: str) -> str:
    _post(lean=False)
    return value


@app.task(name="bench.post_lean", acks_late=True)
def post_lean(value: str) -> str:
    _post(lean=True)
    return value
