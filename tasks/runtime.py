"""The worker process's collaborators, built once on first use."""

from __future__ import annotations

import threading

import requests

from fulfilment.config import Settings
from fulfilment.durability import require_durable
from fulfilment.flow import Services
from fulfilment.onebox.auth import TokenProvider
from fulfilment.onebox.guard import OneboxGuard
from fulfilment.wiring import build_services

_lock = threading.Lock()
_services: Services | None = None
_settings: Settings | None = None
_durable_checked = False
_credentials_checked = False


def services() -> Services:
    global _services
    with _lock:
        if _services is None:
            _services = build_services(_settings or Settings.from_env())
        return _services


def check_durable_once() -> None:
    """Raise ``ConfigError`` unless the ledger's Redis is durable (checked once per process)."""
    global _durable_checked
    if _durable_checked:
        return
    built = services()
    require_durable(built.settings, built.ledger.redis)
    _durable_checked = True


def check_credentials_once() -> None:
    """Raise ``ConfigError`` if Onebox refuses our credentials (asked once per process).

    A token is fetched whatever the shared cache holds, so the key in force is
    the one tested; Onebox unreachable is a warning only (``TokenProvider.check_credentials``).
    """
    global _credentials_checked
    if _credentials_checked:
        return
    built = services()
    redis_client = built.ledger.redis
    with requests.Session() as session:  # closed: no socket is inherited by the pool
        TokenProvider(built.settings, redis_client, session,
                      guard=OneboxGuard.for_settings(built.settings, redis_client)
                      ).check_credentials()
    _credentials_checked = True


def install(prebuilt: Services) -> None:
    """Use these collaborators (the embedded demo, tests)."""
    global _services, _settings
    with _lock:
        _services, _settings = prebuilt, prebuilt.settings


def reset(settings: Settings | None = None) -> None:
    """Forget the collaborators; the next task builds them anew."""
    global _services, _settings, _durable_checked, _credentials_checked
    with _lock:
        _services, _durable_checked, _credentials_checked = None, False, False
        if settings is not None:
            _settings = settings
