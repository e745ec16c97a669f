"""Checks made before any work is taken: settings, Redis's durability, Onebox's credentials.

Each refusal is one line on stderr naming what is wrong, and exit code 78
(EX_CONFIG from sysexits.h): a configuration error, which a supervisor should
not restart in a tight loop (systemd: ``RestartPreventExitStatus=78``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, NoReturn

from celery.signals import celeryd_after_setup

from fulfilment.config import Settings
from fulfilment.errors import ConfigError
from tasks import runtime

log = logging.getLogger(__name__)

#: sysexits.h's EX_CONFIG: the configuration is wrong; restarting will not help.
EX_CONFIG = 78


def refuse(who: str, message: str) -> NoReturn:
    """One line, no traceback, exit 78."""
    print(f"{who}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


def _celery_command() -> str | None:
    """``worker``, ``beat``, ... when this process is the ``celery`` command, else None."""
    if "celery.bin.celery" not in sys.modules:  # a producer, the fulfilment CLI, a test
        return None
    known = ("worker", "beat", "inspect", "control", "purge", "events", "shell", "call")
    return next((arg for arg in sys.argv[1:] if arg in known), "celery")


def settings_at_import() -> Settings | None:
    """The settings the Celery app is built with as ``tasks`` is imported.

    A bad setting ends a ``celery`` command (worker, beat, inspect) right here,
    with one line. Anywhere else (the ``fulfilment`` command, whose ``--help``
    and ``settings`` must work with any environment; a producer that imports
    ``tasks``) the import goes on, None is returned, and the error is raised
    where settings are first used (the app's configuration, ``runtime.services()``).
    """
    try:
        return Settings.from_env()
    except ConfigError as exc:
        command = _celery_command()
        if command is not None:
            refuse(f"fulfilment {command}", exc.message)
        return None


@celeryd_after_setup.connect
def _checks_before_work(**_: Any) -> None:
    """Exit with one line unless Redis is durable and Onebox accepts our credentials."""
    try:
        runtime.check_durable_once()
        runtime.check_credentials_once()
    except ConfigError as exc:
        refuse("fulfilment worker", exc.message)
