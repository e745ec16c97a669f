"""The fault plan: which calls fail, how, and how often.

``FaultPlan`` is the immutable description (loaded from a dict or JSON, written
back by ``to_dict``); ``FaultInjector`` is its running state (what is left of
each script, the seeded RNG, the rate limiter's bucket, the counts). Keeping the
two apart lets a plan be a default argument and be compared, while the injector
is thrown away and rebuilt whenever the plan is replaced.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: Every endpoint name a plan may configure (as in docs/sandbox.md), plus "*".
ENDPOINTS = ("token", "create", "seats", "seats_auto", "buyer_data", "pre_confirm",
             "confirm", "release", "get_order", "refund")
#: What a script entry may say.
OUTCOMES = ("ok", "error_500", "error_503", "throttle_429", "lost_response", "slow_after",
            "late", "error_401", "error_403")
#: Outcomes that may be drawn at random, each with its own probability. New ones go at
#: the end, so a seeded plan that does not use them draws exactly as before.
_RANDOM_OUTCOMES = ("error_500", "error_503", "throttle_429", "lost_response", "slow_after",
                    "late", "error_401", "error_403")


class FaultPlanError(ValueError):
    """The plan is malformed; the message says where."""


def _number(value: Any, where: str, *, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultPlanError(f"{where} must be a number, got {value!r}")
    if value < 0 or (maximum is not None and value > maximum):
        raise FaultPlanError(f"{where} must be between 0 and {maximum or 'infinity'}")
    return float(value)


@dataclass(frozen=True)
class EndpointFaults:
    """What happens to the calls of one endpoint."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_500: float = 0.0
    error_503: float = 0.0
    throttle_429: float = 0.0
    lost_response: float = 0.0
    slow_after: float = 0.0
    late: float = 0.0
    error_401: float = 0.0
    error_403: float = 0.0
    retry_after: float = 1.0
    slow_after_ms: float = 1000.0
    late_ms: float = 3000.0
    script: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> EndpointFaults:
        """Validate one endpoint's entry."""
        if not isinstance(data, Mapping):
            raise FaultPlanError(f"{where} must be an object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise FaultPlanError(f"{where}: unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "script":
                if not isinstance(value, list | tuple) or any(v not in OUTCOMES for v in value):
                    raise FaultPlanError(f"{where}.script must be a list of {OUTCOMES}")
                values[key] = tuple(value)
            elif key in _RANDOM_OUTCOMES:
                values[key] = _number(value, f"{where}.{key}", maximum=1.0)
            else:
                values[key] = _number(value, f"{where}.{key}")
        faults = cls(**values)
        if sum(getattr(faults, key) for key in _RANDOM_OUTCOMES) > 1.0 + 1e-9:
            raise FaultPlanError(f"{where}: the probabilities add up to more than 1")
        return faults

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (every key, defaults included)."""
        data = asdict(self)
        data["script"] = list(self.script)
        return data


@dataclass(frozen=True)
class RateLimit:
    """A token bucket shared by every API call: ``per_second`` refill, ``burst`` size."""

    per_second: float
    burst: float
    #: Retry-After of the 429; None = the time until the bucket holds a token.
    retry_after: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RateLimit:
        """Validate the ``rate_limit`` entry."""
        if not isinstance(data, Mapping) or set(data) - {"per_second", "burst", "retry_after"}:
            raise FaultPlanError("rate_limit takes per_second, burst and retry_after")
        per_second = _number(data.get("per_second"), "rate_limit.per_second")
        if per_second <= 0:
            raise FaultPlanError("rate_limit.per_second must be > 0")
        burst = _number(data.get("burst", max(1.0, per_second)), "rate_limit.burst")
        if burst < 1:
            raise FaultPlanError("rate_limit.burst must be >= 1")
        retry_after = data.get("retry_after")
        if retry_after is not None:
            retry_after = _number(retry_after, "rate_limit.retry_after")
        return cls(per_second, burst, retry_after)


@dataclass(frozen=True)
class FaultPlan:
    """Per-endpoint faults ("*" for every endpoint without its own), a rate limit, a seed."""

    endpoints: Mapping[str, EndpointFaults] = field(default_factory=dict)
    rate_limit: RateLimit | None = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultPlan:
        """Validate a plan; ``script_remaining`` (as ``GET`` shows it) is ignored."""
        if not isinstance(data, Mapping):
            raise FaultPlanError("a fault plan must be a JSON object")
        unknown = set(data) - {"seed", "endpoints", "rate_limit", "script_remaining"}
        if unknown:
            raise FaultPlanError(f"unknown keys {sorted(unknown)}")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise FaultPlanError("seed must be an integer")
        raw_endpoints = data.get("endpoints", {})
        if not isinstance(raw_endpoints, Mapping):
            raise FaultPlanError("endpoints must be an object")
        endpoints = {}
        for name, entry in raw_endpoints.items():
            if name != "*" and name not in ENDPOINTS:
                raise FaultPlanError(f"unknown endpoint {name!r}; known: {ENDPOINTS}")
            endpoints[name] = EndpointFaults.from_dict(entry, f"endpoints.{name}")
        raw_limit = data.get("rate_limit")
        rate_limit = None if raw_limit is None else RateLimit.from_dict(raw_limit)
        return cls(endpoints=endpoints, rate_limit=rate_limit, seed=seed)

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        """Parse a plan from JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FaultPlanError(f"fault plan is not JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``from_dict(to_dict())`` gives the same plan."""
        return {
            "seed": self.seed,
            "endpoints": {name: faults.to_dict() for name, faults in self.endpoints.items()},
            "rate_limit": None if self.rate_limit is None else asdict(self.rate_limit),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one call: wait ``latency``, then ``outcome``.

    ``slow_after`` is how long a ``slow_after`` call waits after doing the work,
    ``late`` how long a ``late`` call waits before doing it (seconds).
    """

    outcome: str  # "ok", one of OUTCOMES, or "rate_limit"
    latency: float = 0.0
    slow_after: float = 0.0
    retry_after: float = 0.0
    late: float = 0.0


#: The decision for every call when nothing is configured.
OK = Decision("ok")


class FaultInjector:
    """Decides each call's fate from a plan, and counts what it injected."""

    def __init__(self, plan: FaultPlan, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 counts: dict[str, dict[str, int]] | None = None) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed if plan.seed is not None else seed)
        self._clock = clock
        self._scripts = {name: deque(f.script) for name, f in plan.endpoints.items()}
        self._idle = not plan.endpoints and plan.rate_limit is None
        limit = plan.rate_limit
        self._tokens = limit.burst if limit else 0.0
        self._refilled = clock()
        #: endpoint -> outcome -> number injected; may be shared with the next plan's injector.
        self.counts: dict[str, dict[str, int]] = {} if counts is None else counts

    def decide(self, endpoint: str) -> Decision:
        """The fate of the next call to ``endpoint``."""
        if self._idle:
            return OK
        name = endpoint if endpoint in self.plan.endpoints else "*"
        faults = self.plan.endpoints.get(name)
        outcome = "ok"
        script = self._scripts.get(name)
        if script:
            outcome = script.popleft()
        elif not self._take_token():
            outcome = "rate_limit"
        elif faults is not None:
            outcome = self._draw(faults)
        if faults is None:
            faults = _NO_FAULTS
        if outcome == "ok" and not faults.latency_ms and not faults.latency_jitter_ms:
            return OK
        if outcome != "ok":
            per_endpoint = self.counts.setdefault(endpoint, {})
            per_endpoint[outcome] = per_endpoint.get(outcome, 0) + 1
        latency = faults.latency_ms
        if faults.latency_jitter_ms:
            latency += self._rng.uniform(0.0, faults.latency_jitter_ms)
        retry_after = faults.retry_after
        if outcome == "rate_limit":
            retry_after = self._rate_limit_retry_after()
        return Decision(outcome, latency / 1000.0, faults.slow_after_ms / 1000.0, retry_after,
                        faults.late_ms / 1000.0)

    def _draw(self, faults: EndpointFaults) -> str:
        draw = self._rng.random()
        for outcome in _RANDOM_OUTCOMES:
            chance: float = getattr(faults, outcome)
            if draw < chance:
                return outcome
            draw -= chance
        return "ok"

    def _take_token(self) -> bool:
        limit = self.plan.rate_limit
        if limit is None:
            return True
        now = self._clock()
        self._tokens = min(limit.burst, self._tokens + (now - self._refilled) * limit.per_second)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _rate_limit_retry_after(self) -> float:
        limit = self.plan.rate_limit
        assert limit is not None
        if limit.retry_after is not None:
            return limit.retry_after
        return (1.0 - self._tokens) / limit.per_second

    def script_remaining(self) -> dict[str, list[str]]:
        """What is left of each endpoint's script."""
        return {name: list(script) for name, script in self._scripts.items() if script}


_NO_FAULTS = EndpointFaults()
