"""What reaches the upstream, through the real gateway: a scripted upstream records every request head.

The client's hop-by-hop fields (RFC 9110 §7.6.1, and whatever its Connection header names)
and its own claims about where it comes from never reach vLLM; bastion sends one
`x-forwarded-for` with the address it decided, and asks for an uncompressed answer,
because it reads some bodies: a model list it cannot read is refused, never passed on whole.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import httpx

from bastion.auth.keys import KeyFile, create_key, write_key_file
from tests.support import TEST_KEY, ScriptedUpstream, by_path, gateway, respond

MODELS = json.dumps({"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]}).encode()
CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}]}'


def request_head(raw: bytes) -> list[tuple[str, str]]:
    lines = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [(k.strip().lower().decode(), v.strip().decode()) for k, v in (line.split(b":", 1) for line in lines)]


async def test_hop_by_hop_and_forwarded_headers_are_replaced_by_the_gateways_own() -> None:
    chat = respond(200, b'{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
    async with ScriptedUpstream(by_path({b"/v1/chat/completions": chat})) as upstream:
        with gateway("--upstream-url", f"http://127.0.0.1:{upstream.port}", ready=False) as (_, base):
            host, port = base.removeprefix("http://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
                b"authorization: Bearer " + TEST_KEY.encode() + b"\r\n"
                b"content-type: application/json\r\n"
                b"connection: keep-alive, X-Hop-Secret, x-other-hop\r\n"
                b"x-hop-secret: for the next hop only\r\nx-other-hop: 1\r\n"
                b"keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nte: trailers\r\n"
                b"proxy-authorization: Basic c2VjcmV0\r\n"
                b"x-forwarded-for: 6.6.6.6\r\nx-forwarded-for: 7.7.7.7\r\nforwarded: for=6.6.6.6;proto=https\r\n"
                b"x-real-ip: 6.6.6.6\r\nx-forwarded-proto: https\r\nx-forwarded-host: evil.example\r\n"
                b"accept-encoding: gzip, br\r\nx-custom: kept\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(CHAT), CHAT)
            )
            await writer.drain()
            reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply
    # the gateway's own background checks of an external upstream (GET /health, /v1/models) come too
    [sent] = [r for r in upstream.requests if r.startswith(b"POST /v1/chat/completions ")]
    headers = request_head(sent)
    names = [name for name, _ in headers]
    for gone in (
        "connection",
        "x-hop-secret",
        "x-other-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "proxy-authorization",
        "forwarded",
        "x-real-ip",
        "x-forwarded-proto",
        "x-forwarded-host",
    ):
        assert gone not in names, gone  # fmt: skip
    assert [v for k, v in headers if k == "x-forwarded-for"] == ["127.0.0.1"], "one hop: the address bastion decided"
    assert [v for k, v in headers if k == "accept-encoding"] == ["identity"]
    assert ("x-custom", "kept") in headers and ("content-type", "application/json") in headers
    assert TEST_KEY not in sent.decode()


async def test_a_model_list_the_gateway_cannot_read_is_refused_not_passed_on(tmp_path: Path) -> None:
    data = KeyFile()
    _, restricted = create_key(data, name="only-m1", models=["m1"])
    write_key_file(tmp_path / "keys.json", data)

    async def gzipped(request: bytes, writer: asyncio.StreamWriter) -> None:
        body = gzip.compress(MODELS)  # an upstream that compresses whatever it was asked
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()

    async with ScriptedUpstream(by_path({b"/v1/models": gzipped})) as upstream:
        args = ("--upstream-url", f"http://127.0.0.1:{upstream.port}", "--keys-file", str(tmp_path / "keys.json"))
        with gateway(*args, ready=False) as (_, base):
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                filtered = await client.get("/v1/models", headers={"authorization": f"Bearer {restricted}"})
                whole = await client.get("/v1/models", headers={"authorization": f"Bearer {TEST_KEY}"})
    assert filtered.status_code == 502 and b"m2" not in filtered.content, "fails closed: never the whole list"
    assert filtered.json()["error"]["code"] == "upstream_invalid"
    assert whole.status_code == 200 and whole.json()["data"] == json.loads(MODELS)["data"], "unrestricted: untouched"


async def test_every_route_vllm_reads_a_priority_on_carries_the_keys_class_never_the_clients(tmp_path: Path) -> None:
    """vLLM takes `priority` on the Responses API and its pooling routes as on chat: a batch key sending
    `"priority": -1000` there jumped every interactive request in a priority-scheduled engine's queue,
    and one sending none ran at 0, the top class's priority."""
    data = KeyFile()
    _, batch = create_key(data, name="nightly", priority_class="batch")
    write_key_file(tmp_path / "keys.json", data)
    usage = b'{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2,"input_tokens":1,"output_tokens":1}}'
    routes = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/rerank", "/v1/score")
    async with ScriptedUpstream(by_path({r.encode(): respond(200, usage) for r in routes})) as upstream:
        args = ("--upstream-url", f"http://127.0.0.1:{upstream.port}", "--keys-file", str(tmp_path / "keys.json"))
        env = {"BASTION_FAIRNESS": "1", "BASTION_AUDIT_LOG": "off"}
        with gateway(*args, env=env, ready=False) as (_, base):
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                for route in routes:
                    for claimed in ({"priority": -1000}, {}):
                        body = {"model": "m1", "input": "hi", "messages": [], **claimed}
                        answer = await client.post(route, json=body, headers={"authorization": f"Bearer {batch}"})
                        assert answer.status_code == 200, (route, answer.text)
    sent = {}
    for raw in upstream.requests:
        if raw.startswith(b"POST "):
            path = raw.split(b" ", 2)[1].decode()
            sent.setdefault(path, []).append(json.loads(raw.split(b"\r\n\r\n", 1)[1]).get("priority"))
    assert sent == {route: [2, 2] for route in routes}, "batch is order 2: held there, and written in"
