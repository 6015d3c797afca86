"""Streaming through the real gateway to the real simulator, with real clients."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import AUTH, TEST_KEY, gateway, simulator

CHAT = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "tell me a story"}]}


def _raw_stream(url: str, body: dict[str, object], request_id: str) -> bytes:
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"x-request-id": request_id, **AUTH}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return b"".join(r.iter_raw())


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_is_byte_identical_to_direct(sim: str, gw: str, include_usage: bool) -> None:
    body: dict[str, object] = {**CHAT, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    direct = _raw_stream(sim, body, "same-id")
    through = _raw_stream(gw, body, "same-id")
    assert through == direct
    assert through.endswith(b"data: [DONE]\n\n")
    assert (b'"usage":{' in through) is include_usage


def test_openai_sdk_sync(sim: str, gw: str) -> None:
    client = openai.OpenAI(base_url=gw + "/v1", api_key=TEST_KEY, max_retries=0)
    direct = openai.OpenAI(base_url=sim + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    expected = direct.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 12

    chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    assert all(c.usage is None for c in chunks), "the gateway's own usage request must stay hidden"

    with_usage = list(
        client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 12

    assert [m.id for m in client.models.list()] == ["qwen2.5-7b-instruct"]
    completion = client.completions.create(model="qwen2.5-7b-instruct", prompt="once upon", max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_openai_sdk_async(gw: str) -> None:
    client = openai.AsyncOpenAI(base_url=gw + "/v1", api_key=TEST_KEY, max_retries=0)

    async def one_stream() -> str:
        stream = await client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one_stream() for _ in range(8)))
    assert len(set(texts)) == 1 and texts[0]
    reply = await client.chat.completions.create(**CHAT, n=2)  # type: ignore[call-overload]
    assert [c.index for c in reply.choices] == [0, 1]
    await client.close()


def test_curl_streams(gw: str) -> None:
    body = json.dumps({**CHAT, "stream": True})
    result = subprocess.run(
        [
            "curl",
            "-sSN",
            "--max-time",
            "10",
            gw + "/v1/chat/completions",
            "-H",
            "content-type: application/json",
            "-H",
            f"authorization: {AUTH['authorization']}",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    )
    events = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 1 + 12 + 1  # role chunk, 12 tokens, [DONE]; no usage chunk


@pytest.mark.serial  # gaps between arrivals measured
def test_chunks_arrive_as_generated() -> None:
    """With 50 ms between tokens, every event must arrive on its own, about 50 ms apart."""
    with (
        simulator("--itl", "0.05", "--tokens", "10") as (_, sim_url),
        gateway("--upstream-url", sim_url) as (
            _,
            gw_url,
        ),
    ):
        arrivals: list[tuple[float, bytes]] = []
        with httpx.stream("POST", gw_url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as r:
            for chunk in r.iter_raw():
                arrivals.append((time.monotonic(), chunk))
    content = [(t, c) for t, c in arrivals if b'"content":" ' in c]
    assert len(content) == 10, f"coalesced chunks: {[c for _, c in arrivals]}"
    assert all(c.count(b'"content":" ') == 1 for _, c in content)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(content)]
    assert min(gaps) > 0.02, gaps


def _sim_metric(sim_url: str, name: str, **labels: str) -> float:
    text = httpx.get(sim_url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(name)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_upstream(stream: bool) -> None:
    with (
        simulator("--itl", "0.2", "--tokens", "50") as (_, sim_url),
        gateway("--upstream-url", sim_url) as (
            _,
            gw_url,
        ),
    ):
        with httpx.Client(timeout=5) as client:
            if stream:
                with client.stream(
                    "POST", gw_url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH
                ) as r:
                    iterator = r.iter_raw()
                    next(iterator)
                    next(iterator)
            else:
                with pytest.raises(httpx.ReadTimeout):
                    client.post(gw_url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=0.5)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if _sim_metric(sim_url, "vllm:request_success_total", finished_reason="abort") == 1:
                break
            time.sleep(0.05)
        assert _sim_metric(sim_url, "vllm:request_success_total", finished_reason="abort") == 1
        assert _sim_metric(sim_url, "vllm:num_requests_running") == 0
