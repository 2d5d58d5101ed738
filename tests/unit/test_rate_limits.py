"""Per-key token buckets, on a clock the test moves."""

from __future__ import annotations

import pytest

from server.auth.keys import ApiKey
from server.auth.limits import RateLimiter, duration_text
from server.errors import RateLimitedError
from server.transport.auth import presented_key, rate_limit_headers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(name: str = "k", rpm: int | None = None, tpm: int | None = None) -> ApiKey:
    return ApiKey(name, b"\0" * 32, None, rpm, tpm)


def test_requests_burst_to_the_limit_then_wait_for_the_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(window_s=60, clock=clock)
    k = key(rpm=3)
    remaining = [limiter.admit(k).requests for _ in range(3)]
    assert [s.remaining for s in remaining if s] == [2, 1, 0]
    with pytest.raises(RateLimitedError) as refused:
        limiter.admit(k)
    assert refused.value.grpc_status == "RESOURCE_EXHAUSTED"
    assert refused.value.http_status == 429
    assert refused.value.retry_after_s == pytest.approx(20.0)  # one request per 20 s
    assert "3 requests per minute" in refused.value.message
    clock.now += 19.9
    with pytest.raises(RateLimitedError):
        limiter.admit(k)
    clock.now += 0.2
    state = limiter.admit(k).requests
    assert state is not None
    assert state.remaining == 0
    # Other keys have their own buckets.
    assert limiter.admit(key("other", rpm=1)).requests is not None


def test_the_window_setting_scales_the_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(window_s=2, clock=clock)
    k = key(rpm=2)
    limiter.admit(k)
    limiter.admit(k)
    with pytest.raises(RateLimitedError) as refused:
        limiter.admit(k)
    assert refused.value.retry_after_s == pytest.approx(1.0)
    assert "per 2 s" in refused.value.message
    clock.now += 2
    state = limiter.admit(k).requests
    assert state is not None
    assert state.remaining == 1


def test_tokens_are_charged_after_the_call_and_may_overdraw_once() -> None:
    clock = Clock()
    limiter = RateLimiter(window_s=60, clock=clock)
    k = key(tpm=100)
    tokens = limiter.admit(k).tokens
    assert tokens is not None
    assert tokens.remaining == 100
    limiter.charge_tokens(k, 160)  # a call that used more than was left: admitted anyway
    with pytest.raises(RateLimitedError) as refused:
        limiter.admit(k)
    # 60 tokens in debt, then one more to be admitted, at 100 per minute.
    assert refused.value.retry_after_s == pytest.approx(61 * 0.6)
    assert "100 tokens per minute" in refused.value.message
    clock.now += 36.7
    assert limiter.admit(k).tokens is not None
    # A refused call takes nothing from the requests bucket either.
    both = key("both", rpm=1, tpm=10)
    limiter.charge_tokens(both, 15)
    with pytest.raises(RateLimitedError):
        limiter.admit(both)
    limiter.charge_tokens(both, -5)  # nothing to charge
    clock.now += 60
    assert limiter.admit(both).requests is not None


def test_keys_without_limits_are_not_tracked() -> None:
    limiter = RateLimiter()
    admission = limiter.admit(key())
    assert admission.requests is None
    assert admission.tokens is None
    limiter.charge_tokens(key(), 10**9)
    assert rate_limit_headers(admission) == ()


def test_a_changed_limit_keeps_what_was_used() -> None:
    clock = Clock()
    limiter = RateLimiter(window_s=60, clock=clock)
    for _ in range(5):
        limiter.admit(key(rpm=10))
    state = limiter.admit(key(rpm=20)).requests
    assert state is not None
    assert (state.limit, state.remaining) == (20, 14)
    state = limiter.peek(key(rpm=6))
    assert state.requests is not None
    assert state.requests.remaining == 0


def test_openai_style_headers() -> None:
    clock = Clock()
    limiter = RateLimiter(window_s=60, clock=clock)
    k = key(rpm=60, tpm=1000)
    limiter.charge_tokens(k, 250)
    headers = dict(rate_limit_headers(limiter.admit(k)))
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "750",
        "x-ratelimit-reset-tokens": "15s",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.0201, "21ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (360.0, "6m0s"),
        (61.25, "1m1.25s"),
    ],
)
def test_durations_read_like_openais(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("x-api-key", "abc"),), "abc"),
        ((("x-api-key", "xyz"), ("authorization", "Bearer abc")), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization-bin", b"abc"),), None),
        ((), None),
        (None, None),
    ],
)
def test_the_key_is_taken_from_authorization_or_x_api_key(
    metadata: tuple[tuple[str, str | bytes], ...] | None, expected: str | None
) -> None:
    assert presented_key(metadata) == expected
