"""Hostile input, property-based: bodies, headers, paths and methods against the real app in-process.

The app is `create_app` behind httpx.ASGITransport, forwarding to a scripted upstream
(a real socket) that answers every request with a small JSON body and records what it
got. Whatever hypothesis sends, every answer is either the upstream's (a pass-through)
or the gateway's own OpenAI-shaped error with a status from a small fixed set; nothing
is a 500, the app keeps answering, and the client's key appears in no body.

schemathesis does not apply: the gateway publishes no OpenAPI document (FastAPI's is
turned off, and /v1 is a plain-ASGI passthrough whose schema is vLLM's), so the
strategies below are written by hand from OpenAI's request shapes.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.app import Gateway, create_app
from bastion.config import Settings
from bastion.context import Exchange
from bastion.request_body import lax_bool
from tests.support import AUTH, TEST_KEY, ScriptedUpstream

UPSTREAM_BODY = b'{"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
GATEWAY_STATUSES = {400, 401, 403, 404, 405, 408, 413, 429}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


async def _answer(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
        % (len(UPSTREAM_BODY), UPSTREAM_BODY)
    )
    await writer.drain()


class Rig:
    """One event loop, one scripted upstream, one app and client for a whole test."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        upstream: ScriptedUpstream,
        app: Gateway,
        client: httpx.AsyncClient,
        seen: list[Exchange],
    ) -> None:
        self.loop, self.upstream, self.app, self.client, self.seen = loop, upstream, app, client, seen

    def __repr__(self) -> str:
        return "Rig()"

    def raw(self, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> httpx.Response:
        """Straight to the ASGI app, with the scope a server builds (httpx would normalise the path)."""
        sent: list[dict[str, Any]] = []
        bodies = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if bodies:
                return bodies.pop()
            await asyncio.Event().wait()  # no disconnect: the response phase waits, as on a live connection
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": method,
            "path": urllib.parse.unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": b"",
            "headers": headers if headers is not None else [(b"authorization", AUTH["authorization"].encode())],
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
            "scheme": "http",
            "root_path": "",
        }
        self.loop.run_until_complete(self.app(scope, receive, send))  # type: ignore[arg-type]
        start = sent[0]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return httpx.Response(start["status"], headers=start["headers"], content=body)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, path, **kw))

    def forwarded(self) -> int:
        return len(self.upstream.requests)


@pytest.fixture
def rig() -> Iterator[Rig]:
    loop = asyncio.new_event_loop()
    upstream = loop.run_until_complete(ScriptedUpstream(_answer).__aenter__())
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        upstream_url=f"http://127.0.0.1:{upstream.port}",
        api_keys=TEST_KEY,
        rate_limit_rpm=0,
        rate_limit_tpm=0,
        rate_limit_max_concurrent=0,
        auth_failure_limit=0,
        max_body_bytes=64 * 1024,
        audit_log="off",
    )
    seen: list[Exchange] = []
    app = create_app(config, listeners=[seen.append])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    client = httpx.AsyncClient(transport=transport, base_url="http://gw", headers=AUTH, timeout=10)
    yield Rig(loop, upstream, app, client, seen)
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(upstream.__aexit__())
    loop.close()


def assert_clean(response: httpx.Response, allowed: set[int] | None = None) -> None:
    """A pass-through of the upstream's answer, or the gateway's own OpenAI-shaped error."""
    assert TEST_KEY not in response.text
    if response.status_code == 200 and response.content == UPSTREAM_BODY:
        return
    assert response.status_code in (allowed or GATEWAY_STATUSES), (response.status_code, response.text[:200])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["code"], str)


# --- bodies ---------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
# Text with what breaks naive code: NUL, lone surrogates (as JSON escapes), RTL marks, emoji, CR/LF.
nasty_text = st.text(
    alphabet=st.characters(codec=None, blacklist_categories=("Cs",)) | st.sampled_from(["\x00", "\r", "\n", "\u202e"]),
    max_size=200,
)
# What vLLM's lax bool accepts (pydantic v2): the gateway must read them as the model server does.
lax_bools = st.sampled_from(
    [True, False, 1, 0, 1.0, 0.0, "true", "FALSE", "1", "0", "yes", "No", "on", "off", "t", "F"]
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | nasty_text,
        "messages": json_values
        | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": nasty_text})),
        "stream": json_values | lax_bools,
        "stream_options": json_values | st.fixed_dictionaries({"include_usage": json_values | lax_bools}),
        "max_tokens": json_values,
        "max_completion_tokens": json_values,
    },
)


@FUZZ
@given(body=st.binary(max_size=2048))
def test_arbitrary_bytes_as_a_body(rig: Rig, body: bytes) -> None:
    response = rig.request("POST", "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_clean(response, {400})


@FUZZ
@given(payload=requests)
def test_wrong_types_unicode_and_nul_in_known_fields(rig: Rig, payload: dict[str, Any]) -> None:
    before = rig.forwarded()
    response = rig.request("POST", "/v1/chat/completions", json=payload)
    assert_clean(response, set())  # every JSON object is forwarded: the model server judges its fields
    assert rig.forwarded() == before + 1
    sent = json.loads(rig.upstream.requests[-1].partition(b"\r\n\r\n")[2])
    options = payload.get("stream_options")
    asked = options.get("include_usage", True) if isinstance(options, dict) else None  # vLLM's default: true
    if (
        lax_bool(payload.get("stream")) is True
        and (options is None or isinstance(options, dict))
        and (asked is None or lax_bool(asked) is False)  # not asked already, nor a value vLLM refuses
    ):
        assert sent["stream_options"] == {**(options or {}), "include_usage": True}, "usage asked for, options kept"
        assert {k: v for k, v in sent.items() if k != "stream_options"} == {
            k: v for k, v in payload.items() if k != "stream_options"
        }
    else:
        assert sent == payload, "forwarded untouched"


@FUZZ
@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_not_an_object(rig: Rig, value: Any) -> None:
    response = rig.request("POST", "/v1/chat/completions", content=json.dumps(value).encode())
    assert_clean(response, {400})
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,  # RecursionError inside json.loads
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"max_tokens":' + b"9" * 5000 + b"}",  # past Python's int digit limit
        b'{"model":"\xff\xfe"}',  # not UTF-8
        b'{"model":"a\x00b"}',  # a raw NUL inside a string
        b"\x00" * 1000,
        b'{"model":"m"',  # truncated
    ],
    ids=["deep-array", "deep-object", "huge-int", "bad-utf8", "raw-nul", "nuls", "truncated"],
)
def test_bodies_json_cannot_parse(rig: Rig, body: bytes) -> None:
    response = rig.request("POST", "/v1/chat/completions", content=body)
    assert_clean(response, {400, 413})
    assert rig.forwarded() == 0
    assert rig.request("GET", "/health").status_code == 200


def test_huge_strings(rig: Rig) -> None:
    fits = {"model": "m", "messages": [{"role": "user", "content": "x" * 60_000}]}
    assert_clean(rig.request("POST", "/v1/chat/completions", json=fits), set())
    too_big = {"model": "m", "messages": [{"role": "user", "content": "x" * 70_000}]}
    response = rig.request("POST", "/v1/chat/completions", json=too_big)
    assert_clean(response, {413})
    assert response.json()["error"]["code"] == "request_too_large"
    long_model = {"model": "m" * 50_000, "messages": []}  # no model has such a name: never a metric label
    response = rig.request("POST", "/v1/chat/completions", json=long_model)
    assert_clean(response, {400})
    assert response.json()["error"]["code"] == "invalid_model" and rig.seen[-1].status == 400


# --- headers --------------------------------------------------------------------------------

MARK = "Qx7Kp2Lm9Rt4"
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"))


@FUZZ
@given(value=header_text)
def test_arbitrary_authorization_values_are_refused(rig: Rig, value: str) -> None:
    value += MARK  # a value no fixed message contains, so an echo would show
    response = rig.request(
        "POST", "/v1/chat/completions", json={"model": "m"}, headers={"authorization": value.encode("latin-1")}
    )
    assert response.status_code == 401
    assert_clean(response, {401})
    assert response.headers["www-authenticate"] == "Bearer"
    assert MARK not in response.text, "the credential is never echoed"


@FUZZ
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20), value=header_text)
def test_arbitrary_other_headers_never_break_a_request(rig: Rig, name: str, value: str) -> None:
    if name in ("content-length", "transfer-encoding", "authorization", "host", "content-type", "expect"):
        return
    response = rig.request("POST", "/v1/chat/completions", json={"model": "m"}, headers={name: value.encode("latin-1")})
    assert_clean(response, {400})


@pytest.mark.parametrize(
    "values",
    [
        [f"Bearer {TEST_KEY}", "Bearer bst-wrong_" + "x" * 43],
        ["Bearer bst-wrong_" + "x" * 43, f"Bearer {TEST_KEY}"],
        [f"Bearer {TEST_KEY}", f"Bearer {TEST_KEY}"],
    ],
    ids=["right-then-wrong", "wrong-then-right", "twice"],
)
def test_duplicated_authorization_is_refused(rig: Rig, values: list[str]) -> None:
    headers = [("authorization", v) for v in values] + [("content-type", "application/json")]
    request = rig.client.build_request("POST", "/v1/chat/completions", content=b'{"model":"m"}')
    request.headers = httpx.Headers(headers)
    response = rig.loop.run_until_complete(rig.client.send(request))
    assert response.status_code == 401
    assert_clean(response, {401})
    assert rig.forwarded() == 0


def test_oversized_credentials(rig: Rig) -> None:
    for token in ("bst-" + "a" * 10_000, "eyJ" + "a" * 10_000 + ".b.c", "x" * 100_000):
        response = rig.request("GET", "/v1/models", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert_clean(response, {401})


# --- paths and methods ----------------------------------------------------------------------

segment = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#"), max_size=12)


@FUZZ
@given(segments=st.lists(segment | st.sampled_from(["..", ".", "%2e%2e", "%2F", "%5c", "%00", "é"]), max_size=5))
def test_arbitrary_paths_under_v1(rig: Rig, segments: list[str]) -> None:
    path = "/v1/" + "/".join(segments)
    before = rig.forwarded()
    response = rig.raw("GET", path.encode())
    assert_clean(response, {404})
    lowered = path.lower()
    if any(bad in lowered for bad in ("%2e", "%2f", "%5c", "\\")) or any(s in (".", "..") for s in segments):
        assert response.status_code == 404 and rig.forwarded() == before, "never forwarded"


@pytest.mark.parametrize(
    "raw_path",
    [b"/v1/../metrics", b"/v1/%2e%2e/metrics", b"/v1/models/..%2f..%2fmetrics", b"/v1/.%2e/health", b"/v1/a\\..\\b"],
)
def test_traversal_never_reaches_the_upstream(rig: Rig, raw_path: bytes) -> None:
    response = rig.raw("GET", raw_path)
    assert response.status_code == 404
    assert_clean(response, {404})
    assert rig.forwarded() == 0


@FUZZ
@given(method=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=10), v1=st.booleans())
def test_arbitrary_methods(rig: Rig, method: str, v1: bool) -> None:
    path = "/v1/chat/completions" if v1 else "/health"
    response = rig.request(method, path)
    if method in ("GET", "POST") or (method == "HEAD" and not v1):
        return
    assert response.status_code == 405
    if method != "HEAD":
        assert_clean(response, {405})


def test_unknown_routes_outside_v1(rig: Rig) -> None:
    for path in ("/", "/v2/chat/completions", "/admin", "/tokenize", "/.env", "/metrics/../health", "/v1"):
        response = rig.raw("GET", path.encode())
        assert response.status_code == 404
        assert_clean(response, {404})
        assert rig.raw("GET", path.encode(), headers=[]).status_code == 401, "deny by default"
    assert rig.forwarded() == 0


def test_token_endpoint_refuses_an_oversized_body_in_shape() -> None:
    """It used to return without a response (the server then sent a bare 500)."""
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        upstream_url="http://127.0.0.1:9",
        api_keys=TEST_KEY,
        jwt_secret="s" * 32,
        token_endpoint=True,
        audit_log="off",
    )
    app = create_app(config)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.post("/v1/auth/token", content=b"{" + b" " * 100_000 + b"}", headers=AUTH)

    response = asyncio.run(go())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
