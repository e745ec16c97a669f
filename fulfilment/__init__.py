"""The fulfilment domain: Onebox client, purchase steps, ledger, results, producers.

This package never imports Celery; ``tasks`` wraps it. As a library it never
configures logging: it only adds a ``NullHandler`` so an unconfigured
application prints nothing.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
