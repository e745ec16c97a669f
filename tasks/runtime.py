"""The worker process's collaborators, built once on first use."""

from __future__ import annotations

import threading

from fulfilment.config import Settings
from fulfilment.flow import Services
from fulfilment.wiring import build_services

_lock = threading.Lock()
_services: Services | None = None
_settings: Settings | None = None


def services() -> Services:
    global _services
    with _lock:
        if _services is None:
            _services = build_services(_settings or Settings.from_env())
        return _services


def install(prebuilt: Services) -> None:
    """Use these collaborators (the embedded demo, tests)."""
    global _services, _settings
    with _lock:
        _services, _settings = prebuilt, prebuilt.settings


def reset(settings: Settings | None = None) -> None:
    """Forget the collaborators; the next task builds them anew."""
    global _services, _settings
    with _lock:
        _services = None
        if settings is not None:
            _settings = settings
