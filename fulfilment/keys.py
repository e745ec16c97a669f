"""Every Redis key and queue name this project owns, in one place.

All start with the deployment's prefix, so one Redis can hold several
deployments, or several test runs, side by side.

A key of one intent puts the reference between braces, ``<prefix>:{<ref>}:ledger``:
no reference may hold a brace and no other key has one right after the prefix
(the Onebox guard's keys tag theirs after ``onebox:``), so no reference, however
it is spelled (``open``, ``a:lease``, ``x}:ledger``...), can name a key of ours
or of another intent. The braces are also a Redis Cluster hash tag: every key
of one intent lands in one slot.

A batch (the intent's ``batch`` field, spelled by the same rule as a reference)
has keys of the same shape, ``<prefix>:{<batch>}:batch...``: their suffixes
(``batch``, ``batch:open``, ``batch:members``) are none of an intent's
(``ledger``, ``lease``), so a batch id equal to a reference reaches no key of
that intent, and the batch's keys share a slot of their own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def intent_key(self, reference: str, kind: str) -> str:
        """A key of one intent; the reference is the hash tag (see the module docstring)."""
        if "{" in reference or "}" in reference:
            raise ValueError("a reference or batch id cannot hold braces")
        return f"{self.prefix}:{{{reference}}}:{kind}"

    def ledger(self, reference: str) -> str:
        """Hash: where one intent stands."""
        return self.intent_key(reference, "ledger")

    @property
    def ledger_pattern(self) -> str:
        """SCAN pattern matching every intent's ledger entry."""
        return f"{self.prefix}:{{*}}:ledger"

    @property
    def open_intents(self) -> str:
        """Sorted set: references without a published outcome, scored by last progress."""
        return f"{self.prefix}:ledger:open"

    @property
    def holds(self) -> str:
        """Sorted set: held intents, scored by when their hold lapses (Redis's clock)."""
        return f"{self.prefix}:ledger:holds"

    def lease(self, reference: str) -> str:
        """String with expiry: which worker is acting on an intent now."""
        return self.intent_key(reference, "lease")

    # --- refunds (fulfilment.refunds) -----------------------------------------------
    def refund(self, refund_id: str) -> str:
        """Hash: where one refund stands. The id sits in braces, as a reference does, so
        no id (``open``, ``x:lease``) names another refund's key or the open set."""
        if "{" in refund_id or "}" in refund_id:
            raise ValueError("a refund id cannot hold braces")
        return f"{self.prefix}:refund:{{{refund_id}}}"

    def refund_lease(self, refund_id: str) -> str:
        """String with expiry: which worker is acting on a refund now."""
        return f"{self.refund(refund_id)}:lease"

    @property
    def open_refunds(self) -> str:
        """Sorted set: refund ids without a published outcome, scored by last progress."""
        return f"{self.prefix}:refund:open"

    # --- batches: counters kept by the ledger's scripts ----------------------------
    def batch(self, batch_id: str) -> str:
        """Hash: how many of a batch's intents were admitted, and how many ended how."""
        return self.intent_key(batch_id, "batch")

    def batch_open(self, batch_id: str) -> str:
        """Sorted set: a batch's references without an outcome, scored by admission time."""
        return self.intent_key(batch_id, "batch:open")

    def batch_members(self, batch_id: str) -> str:
        """Sorted set: every reference admitted in a batch, scored by admission order."""
        return self.intent_key(batch_id, "batch:members")

    @property
    def intake(self) -> str:
        """List: plain JSON intents pushed by producers in any language."""
        return f"{self.prefix}:intake"

    @property
    def intake_processing(self) -> str:
        """List: intents taken off ``intake`` but not yet admitted, by a drainer of the
        versions before chunked drains (taken back by the drain: ``fulfilment.intake``)."""
        return f"{self.prefix}:intake:processing"

    def intake_taken(self, drainer: str) -> str:
        """List: the chunk one drainer took off ``intake`` and has not yet taken in."""
        return f"{self.prefix}:intake:processing:{drainer}"

    @property
    def intake_drainers(self) -> str:
        """Sorted set: drainer id -> when its lease lapses (ms, Redis's clock)."""
        return f"{self.prefix}:intake:drainers"

    @property
    def intake_lock(self) -> str:
        """String: held by a drainer of the versions before chunked drains (one at a time)."""
        return f"{self.prefix}:intake:lock"

    @property
    def intake_drained(self) -> str:
        """String: when the intake was last drained (epoch seconds); ``fulfilment health``."""
        return f"{self.prefix}:intake:drained_at"

    # --- bulk flow control (fulfilment.release) ----------------------------------
    def bulk_ready(self, shop: str) -> str:
        """List: a shop's admitted bulk references waiting to be released, oldest first."""
        return f"{self.bulk_ready_prefix}{shop}"

    @property
    def bulk_ready_prefix(self) -> str:
        return f"{self.prefix}:bulk:ready:"

    @property
    def bulk_shops(self) -> str:
        """List: the shops with bulk work waiting, in the order they are served next."""
        return f"{self.prefix}:bulk:shops"

    @property
    def bulk_in_flight(self) -> str:
        """Sorted set: bulk references released to the broker without an outcome yet,
        scored by when (Redis's clock)."""
        return f"{self.prefix}:bulk:in_flight"

    # --- unsettled intents, read again on a schedule (fulfilment.unsettled) --------
    @property
    def unsettled(self) -> str:
        """Sorted set: unsettled references -> their next check (Redis's clock; +inf once
        they left the schedule, past ``FULFILMENT_SETTLE_FOR``)."""
        return f"{self.prefix}:unsettled"

    @property
    def unsettled_since(self) -> str:
        """Sorted set: unsettled references -> when they became unsettled (Redis's clock)."""
        return f"{self.prefix}:unsettled:since"

    @property
    def unsettled_info(self) -> str:
        """Hash: unsettled reference -> JSON of its checks, last answer, order code, batch."""
        return f"{self.prefix}:unsettled:info"

    @property
    def unsettled_lock(self) -> str:
        """String: held by the scheduled settlement while it runs (one at a time)."""
        return f"{self.prefix}:unsettled:lock"

    @property
    def sweep_lock(self) -> str:
        return f"{self.prefix}:sweep:lock"

    @property
    def dispatch_owed(self) -> str:
        """Hash: reference -> its ``updated_at`` when its dispatch failed (``fulfilment.owed``)."""
        return f"{self.prefix}:dispatch:owed"

    def callbacks(self, kind: str) -> str:
        """A key of the callback outbox (``fulfilment.callbacks``): ``due`` (sorted set:
        delivery -> next try), ``since`` (sorted set: delivery -> when published), ``body``
        (hash: delivery -> JSON), ``attempts`` (hash), ``seq`` (counter), ``hold`` (hash:
        endpoint -> its backoff), ``lock`` (the one sender running)."""
        return f"{self.prefix}:callbacks:{kind}"

    def session_cap(self, session_id: int, kind: str) -> str:
        """A sorted set of the cap per Onebox session (``holders``, ``line``, ``seen``).

        One hash tag for all sessions: a take touches every session of an intent
        in one script, so on a Redis Cluster they share a slot.
        """
        return f"{self.prefix}:sessioncap:{{sessions}}:{int(session_id)}:{kind}"

    def onebox_guard(self, scope: str, kind: str) -> str:
        """A key of the fleet's shared Onebox limits (``rate``, ``breaker``, ``probe``).

        ``scope`` names one Onebox account (a hash of host and channel). It is the
        hash tag, so the keys one script touches share a Redis Cluster slot.
        """
        return f"{self.prefix}:onebox:{{{scope}}}:{kind}"

    # --- orders by code, and Onebox's webhooks (fulfilment.webhooks) ---------------
    def order_code(self, code: str) -> str:
        """String: the reference of the intent whose order has this Onebox code."""
        return f"{self.prefix}:order:{code}"

    def webhook_seen(self, code: str, action: str) -> str:
        """String with expiry: a webhook for (order code, action) was handed to a task.

        Not the delivery id: Onebox makes a new one for every attempt.
        """
        return f"{self.prefix}:webhook:seen:{action}:{code}"

    def aftersale_published(self, code: str, action: str) -> str:
        """String with expiry: the after-sale event of (order code, action) is published."""
        return f"{self.prefix}:aftersale:published:{action}:{code}"

    def aftersale_lock(self, code: str, action: str) -> str:
        """String with expiry: a worker is publishing that after-sale event now."""
        return f"{self.prefix}:aftersale:lock:{action}:{code}"

    # --- broker names (queues and exchanges) -----------------------------------
    @property
    def task_queue(self) -> str:
        """New intents of the bulk lane (and anything not routed elsewhere)."""
        return f"{self.prefix}.purchase"

    @property
    def live_queue(self) -> str:
        """New intents of the live lane: served before the bulk lane's (``task_queue``)."""
        return f"{self.prefix}.purchase.live"

    @property
    def continue_queue(self) -> str:
        """Purchases under way (pre-confirm, confirm, publish), apart from new ones."""
        return f"{self.prefix}.purchase.continue"

    @property
    def maintenance_queue(self) -> str:
        return f"{self.prefix}.maintenance"

    @property
    def intake_queue(self) -> str:
        """RabbitMQ: plain JSON intents from any AMQP client (``fulfilment.intake_queue``)."""
        return f"{self.prefix}.intake"

    @property
    def results_exchange(self) -> str:
        return f"{self.prefix}.results"

    @property
    def results_queue(self) -> str:
        return f"{self.prefix}.results"

    @property
    def refunds_queue(self) -> str:
        """Refund outcomes (``refund.#`` on the results exchange), kept until read."""
        return f"{self.prefix}.refunds"

    @property
    def aftersale_queue(self) -> str:
        """After-sale events (refunds, cancellations made elsewhere) for the shop."""
        return f"{self.prefix}.aftersale"

    @property
    def failures_queue(self) -> str:
        """Messages that could not be taken in at all, with their reason."""
        return f"{self.prefix}.failures"
