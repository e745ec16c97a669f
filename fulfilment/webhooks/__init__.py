"""Onebox's webhooks in: ``fulfilment webhooks`` receives them, a task acts on them.

- ``signature``: the ``ob-signature`` schemes (a switch: Onebox does not say).
- ``notice``: what a webhook told us, handed from the receiver to the task.
- ``receiver``: the WSGI app (check, deduplicate, hand over, answer fast).
- ``dedupe``: the (order code, action) marks of webhooks handed over.
- ``server``: waitress serving the receiver.
- ``actions``: what the task does (settle a purchase, publish an after-sale event).

Celery stays out: the receiver is given a ``hand_over`` callable by ``tasks.webhooks``.
"""
