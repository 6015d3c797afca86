"""Rate limits through the real gateway: requests/min, tokens/min, concurrency, Redis sharing, fail modes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support import AUTH, TEST_KEY, gateway, redis_server, simulator

MODEL = "qwen2.5-7b-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}
UNLIMITED = {"BASTION_RATE_LIMIT_RPM": "0", "BASTION_RATE_LIMIT_TPM": "0", "BASTION_RATE_LIMIT_MAX_CONCURRENT": "0"}
HEADERS = [f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")]


def limits(**values: int | str) -> dict[str, str]:
    return {**UNLIMITED, **{f"BASTION_{k.upper()}": str(v) for k, v in values.items()}}


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=TEST_KEY, max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    with simulator("--tokens", "12") as (_, base):
        yield base


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[str]:
    """Streams take ~4 s: long enough to hold concurrency slots."""
    with simulator("--tokens", "40", "--itl", "0.1") as (_, base):
        yield base


def test_requests_per_minute_429_with_headers_and_sdk_error(sim: str) -> None:
    with gateway("--upstream-url", sim, env=limits(rate_limit_rpm=3, rate_limit_tpm=100_000)) as (_, base):
        client = sdk(base)
        for expected_remaining in (2, 1, 0):
            raw = client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
            assert raw.status_code == 200
            for name in HEADERS:
                assert name in raw.headers
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            assert raw.headers["x-ratelimit-remaining-requests"] == str(expected_remaining)
            assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(**CHAT)
        error = refused.value
        assert error.status_code == 429
        assert error.code == "rate_limit_exceeded"
        assert "3 requests per minute" in error.message
        retry_after = int(error.response.headers["retry-after"])
        assert 1 <= retry_after <= 60
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert error.response.headers["x-ratelimit-limit-tokens"] == "100000"
        assert error.response.headers["x-request-id"]


def _usage_direct(sim: str, body: bytes, stream: bool) -> int:
    """What the simulator reports for `body` (deterministic), asked directly."""
    if stream:
        asked = json.dumps({**json.loads(body), "stream_options": {"include_usage": True}})
        with httpx.stream("POST", sim + "/v1/chat/completions", content=asked, timeout=10) as response:
            text = "".join(response.iter_text())
        usage_line = next(line for line in text.splitlines() if '"usage"' in line)
        return int(usage_line.split('"total_tokens":')[1].split(",")[0].rstrip("}"))
    return int(httpx.post(sim + "/v1/chat/completions", content=body, timeout=10).json()["usage"]["total_tokens"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tokens_per_minute_reserved_then_charged_from_real_usage(sim: str, stream: bool) -> None:
    body = json.dumps({**CHAT, "stream": stream, "max_tokens": 12}).encode()
    used = _usage_direct(sim, body, stream)
    reserved = len(body) // 4 + 12  # the prompt estimate (bytes / 4) and max_tokens
    assert reserved > used
    tpm = 3 * used + reserved - 1  # three fit one after the other; then what is left is less than a reservation
    if 60 - time.time() % 60 < 8:  # the window counts whole minutes: keep the test inside one
        time.sleep(60 - time.time() % 60)
    with (
        gateway("--upstream-url", sim, env=limits(rate_limit_tpm=tpm)) as (_, base),
        httpx.Client(base_url=base, timeout=10, headers=AUTH) as http,
    ):
        remaining = []
        for _ in range(3):
            with http.stream("POST", "/v1/chat/completions", content=body) as response:
                assert response.status_code == 200
                text = response.read()
                remaining.append(int(response.headers["x-ratelimit-remaining-tokens"]))
            if stream:  # the client did not ask for usage: the gateway's own usage event is hidden
                assert b'"usage"' not in text
        # Remaining counts this request's reservation, and the earlier ones settled to their usage.
        assert remaining == [tpm - reserved, tpm - used - reserved, tpm - 2 * used - reserved]
        refused = http.post("/v1/chat/completions", content=body)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert f"tokens per minute (this request needs {reserved})" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(reserved - 1)
        assert int(refused.headers["retry-after"]) >= 1
        small = http.post("/v1/chat/completions", content=body.replace(b'"max_tokens": 12', b'"max_tokens": 1'))
        assert small.status_code == 200  # a smaller reservation still fits


def _open_stream(http: httpx.Client) -> tuple[httpx.Response, Iterator[bytes]]:
    """A stream that has started; keep the iterator referenced (dropping it closes the response)."""
    request = http.build_request("POST", "/v1/chat/completions", json={**CHAT, "stream": True})
    response = http.send(request, stream=True)
    assert response.status_code == 200
    chunks = response.iter_raw()
    next(chunks)  # generation has started
    return response, chunks


def _admitted_within(http: httpx.Client, seconds: float, **request: object) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        response = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1, **request})
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_concurrency_limit_and_slot_released_on_client_disconnect(slow_sim: str) -> None:
    env = limits(rate_limit_max_concurrent=2)
    with (
        gateway("--upstream-url", slow_sim, env=env) as (_, base),
        httpx.Client(base_url=base, timeout=10, headers=AUTH) as http,
        httpx.Client(base_url=base, timeout=10, headers=AUTH) as other,
    ):
        first, _chunks1 = _open_stream(http)
        second, _chunks2 = _open_stream(other)
        refused = httpx.post(base + "/v1/chat/completions", json=CHAT, timeout=10, headers=AUTH)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "2 concurrent requests" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        first.close()  # the client goes away mid-stream
        http.close()
        started = time.monotonic()
        admitted = _admitted_within(other, 3.0)
        assert admitted.status_code == 200, admitted.text
        assert time.monotonic() - started < 3.0  # well before the first stream would have ended
        second.close()


def test_slot_released_after_upstream_crash_and_timeout() -> None:
    with simulator("--crash-after", "1") as (_, crashing):
        env = limits(rate_limit_max_concurrent=1)
        with (
            gateway("--upstream-url", crashing, env=env, ready=False) as (_, base),
            httpx.Client(base_url=base, headers=AUTH) as http,
        ):
            assert http.post("/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
            crashed = http.post("/v1/chat/completions", json=CHAT, timeout=10)  # the upstream dies on this one
            assert crashed.status_code == 502
            after = http.post("/v1/chat/completions", json=CHAT, timeout=10)
            assert after.status_code == 502  # upstream gone, but the slot is free: not 429
    with simulator("--ttft", "3") as (_, slow):
        env = limits(rate_limit_max_concurrent=1, upstream_read_timeout="0.3")
        with gateway("--upstream-url", slow, env=env) as (_, base), httpx.Client(base_url=base, headers=AUTH) as http:
            for _ in range(2):
                assert http.post("/v1/chat/completions", json=CHAT, timeout=10).status_code == 504


def test_two_gateways_sharing_redis_enforce_one_limit_exactly(sim: str) -> None:
    with redis_server() as (_, url):
        env = {**limits(rate_limit_rpm=10, rate_limit_max_concurrent=5), "BASTION_REDIS_URL": url}
        with gateway("--upstream-url", sim, env=env) as (_, one), gateway("--upstream-url", sim, env=env) as (_, two):
            statuses = [
                httpx.post(base + "/v1/chat/completions", json=CHAT, timeout=10, headers=AUTH).status_code
                for _ in range(10)
                for base in (one, two)
            ]
            assert statuses.count(200) == 10
            assert statuses.count(429) == 10
            assert statuses[:10] == [200] * 10  # the combined budget, used in order


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_killed_mid_test_follows_fail_mode(sim: str, mode: str) -> None:
    with redis_server() as (redis, url):
        env = {**limits(rate_limit_rpm=2), "BASTION_REDIS_URL": url, "BASTION_REDIS_FAIL_MODE": mode}
        with (
            gateway("--upstream-url", sim, env=env) as (gw, base),
            httpx.Client(base_url=base, timeout=10, headers=AUTH) as http,
        ):
            assert [http.post("/v1/chat/completions", json=CHAT).status_code for _ in range(3)] == [200, 200, 429]
            redis.stop()
            response = http.post("/v1/chat/completions", json=CHAT)
            if mode == "open":
                assert response.status_code == 200
                assert "x-ratelimit-limit-requests" not in response.headers
                assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            else:
                assert response.status_code == 503
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["code"] == "rate_limit_unavailable"
            output = gw.output()
            assert "rate-limit storage unreachable" in output
            assert output.count("rate-limit storage unreachable") == 1  # once per incident
            scraped = httpx.get(base + "/metrics", timeout=10).text
            # Serving without limits is counted and exported, never silent.
            assert metric(scraped, "bastion_ratelimit_fail_open_total") == (2 if mode == "open" else 0)
            assert metric(scraped, "bastion_ratelimit_storage_errors_total") >= 1


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def redis_cli(url: str, *command: str) -> str:
    result = subprocess.run(["redis-cli", "-u", url, *command], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_limiter_bug_is_a_500_with_a_traceback_never_limits_silently_off(sim: str) -> None:
    """Redis answers, but with something the limiter cannot use (a window key of the wrong type): that is not
    "storage unavailable", so not fail-open: the request gets an OpenAI-shaped 500 and the log a traceback."""
    with redis_server() as (_, url):
        env = {**limits(rate_limit_rpm=5), "BASTION_REDIS_URL": url, "BASTION_REDIS_FAIL_MODE": "open"}
        with (
            gateway("--upstream-url", sim, env=env) as (gw, base),
            httpx.Client(base_url=base, timeout=10, headers=AUTH) as http,
        ):
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            [window] = [k for k in redis_cli(url, "--scan").splitlines() if "/5/1/minute" in k]
            redis_cli(url, "DEL", window)
            redis_cli(url, "HSET", window, "not", "a-window")
            broken = http.post("/v1/chat/completions", json=CHAT)
            assert broken.status_code == 500 and broken.json()["error"]["code"] == "internal_error"
            scraped = httpx.get(base + "/metrics", timeout=10).text
            assert metric(scraped, "bastion_ratelimit_fail_open_total") == 0
            output = gw.output()
    assert "rate limiter failed" in output and "Traceback" in output and "ReplyError: WRONGTYPE" in output
    assert "serving without limits" not in output
