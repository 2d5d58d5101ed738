"""Per-key request and token limits: one token bucket per key and kind, in this process.

A bucket holds up to `limit` units and refills at `limit` per window (a minute by default), so
a key may burst up to its limit and then goes at the limit's pace. A request takes one unit from
the requests bucket when it is admitted. Tokens are counted when a call ends (only then are
they known); a call is admitted while the key's token bucket is not empty, so the last call may
overdraw it, and the next ones wait until it has refilled past zero.

Replicas count apart: with N replicas behind Envoy, a key gets up to N times its limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.auth.keys import ApiKey
from server.errors import RateLimitedError


@dataclass(slots=True)
class Bucket:
    """One token bucket: `level` units of `limit`, as of `updated` (time.monotonic())."""

    limit: int
    level: float
    updated: float

    def refill(self, now: float, rate: float) -> None:
        """Add what `rate` (units a second) brought since the last update."""
        self.level = min(float(self.limit), self.level + (now - self.updated) * rate)
        self.updated = now

    def reset_after_s(self, rate: float) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.limit - self.level) / rate)

    def wait_s(self, rate: float, need: float) -> float:
        """Seconds until the level reaches `need`."""
        return max(0.0, (need - self.level) / rate)


@dataclass(frozen=True, slots=True)
class LimitState:
    """What the x-ratelimit-* headers say about one kind of limit after a call was admitted."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Admission:
    """The limits of an admitted call (None: that limit is not set for the key)."""

    requests: LimitState | None
    tokens: LimitState | None


class RateLimiter:
    """The buckets of every key that has limits; used from the event loop only (no locks)."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def _bucket(self, buckets: dict[str, Bucket], name: str, limit: int, now: float) -> Bucket:
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = Bucket(limit, float(limit), now)
        elif bucket.limit != limit:  # the keys file changed the limit: keep what was used
            used = bucket.limit - bucket.level
            bucket.limit = limit
            bucket.level = limit - used
        bucket.refill(now, limit / self.window_s)
        return bucket

    def admit(self, key: ApiKey) -> Admission:
        """Take one request from the key's budget, or raise RateLimitedError (nothing taken)."""
        now = self._clock()
        requests = tokens = None
        if key.requests_per_minute is not None:
            requests = self._bucket(self._requests, key.name, key.requests_per_minute, now)
        if key.tokens_per_minute is not None:
            tokens = self._bucket(self._tokens, key.name, key.tokens_per_minute, now)
        if requests is not None and requests.level < 1:
            wait = requests.wait_s(requests.limit / self.window_s, 1.0)
            raise RateLimitedError(
                f"API key {key.name!r} is over its limit of {requests.limit} requests per "
                f"{_window(self.window_s)}; retry in {wait:.1f} s",
                retry_after_s=wait,
            )
        if tokens is not None and tokens.level <= 0:
            # Wait until a little over zero, so that the retry is admitted.
            wait = tokens.wait_s(tokens.limit / self.window_s, min(1.0, tokens.limit))
            raise RateLimitedError(
                f"API key {key.name!r} is over its limit of {tokens.limit} tokens per "
                f"{_window(self.window_s)}; retry in {wait:.1f} s",
                retry_after_s=wait,
            )
        if requests is not None:
            requests.level -= 1
        return Admission(
            requests=None if requests is None else self._state(requests),
            tokens=None if tokens is None else self._state(tokens),
        )

    def peek(self, key: ApiKey) -> Admission:
        """The state of the key's limits, taking nothing."""
        now = self._clock()
        states: list[LimitState | None] = []
        for buckets, limit in (
            (self._requests, key.requests_per_minute),
            (self._tokens, key.tokens_per_minute),
        ):
            states.append(
                None if limit is None else self._state(self._bucket(buckets, key.name, limit, now))
            )
        return Admission(states[0], states[1])

    def charge_tokens(self, key: ApiKey, tokens: int) -> None:
        """Count the tokens a finished call of the key used."""
        if key.tokens_per_minute is None or tokens <= 0:
            return
        bucket = self._bucket(self._tokens, key.name, key.tokens_per_minute, self._clock())
        bucket.level -= tokens

    def _state(self, bucket: Bucket) -> LimitState:
        rate = bucket.limit / self.window_s
        remaining = max(0, math.floor(bucket.level))
        return LimitState(bucket.limit, remaining, bucket.reset_after_s(rate))


def _window(seconds: float) -> str:
    return "minute" if seconds == 60 else f"{seconds:g} s"


def duration_text(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
