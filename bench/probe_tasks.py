"""Trivial tasks for bench/chain_hops.py: what a broker hop costs, with no work in it."""

from __future__ import annotations

from tasks.app import app


@app.task(name="bench.noop", acks_late=True)
def noop(value: str) -> str:
    return value
