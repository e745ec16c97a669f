"""The Celery layer: the app, thin tasks, and the Python producer API.

``celery -A tasks worker`` finds ``tasks.app``. Producers call ``submit`` or
``submit_many``; both validate before anything is enqueued. ``batch_status``
tells how a batch stands, from the ledger. ``cancel``, ``cancel_batch`` and
``confirm`` are the shop's say over purchases under way (``tasks.stops``);
``refund`` refunds a confirmed purchase (or some of its items), once.
"""

from tasks import startup  # noqa: F401  (the worker's start-up checks)
from tasks.app import app
from tasks.producer import batch_status, cancel, cancel_batch, confirm, submit, submit_many
from tasks.refunds import refund

__all__ = ["app", "batch_status", "cancel", "cancel_batch", "confirm", "refund", "submit",
           "submit_many"]
