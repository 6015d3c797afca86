"""The lean Redis client against scripted sockets: RESP framing, FIFO matching, timeouts, failures, URLs."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bastion.redisio import (
    NoScript,
    Redis,
    RedisError,
    RedisTimeout,
    RedisUnavailable,
    ReplyError,
    parse_url,
)
from bastion.redisio.resp import Parser, ProtocolError, encode
from tests.support import LoopbackServer

Handler = Callable[[list[bytes], asyncio.StreamWriter], Awaitable[None]]


async def read_command(reader: asyncio.StreamReader) -> list[bytes]:
    """One RESP command (an array of bulk strings) as the server reads it."""
    header = await reader.readuntil(b"\r\n")
    assert header.startswith(b"*"), header
    parts = []
    for _ in range(int(header[1:-2])):
        size = int((await reader.readuntil(b"\r\n"))[1:-2])
        parts.append((await reader.readexactly(size + 2))[:-2])
    return parts


class FakeRedis(LoopbackServer):
    """A real socket on 127.0.0.1 that answers each command through `handler` (which may misbehave)."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.commands: list[list[bytes]] = []
        self.connections = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                command = await read_command(reader)
                self.commands.append(command)
                await self.handler(command, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test ended
        finally:
            writer.close()


def echo(value: Callable[[list[bytes]], bytes] = lambda c: c[-1]) -> Handler:
    async def handler(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        data = value(command)
        writer.write(b"$%d\r\n%s\r\n" % (len(data), data))

    return handler


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[str, float], Redis]]:
    clients: list[Redis] = []

    def make(url: str, timeout: float = 2.0) -> Redis:
        clients.append(Redis.from_url(url, timeout))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


# --- RESP -------------------------------------------------------------------------------------------------


def test_every_reply_parses_whatever_the_reads_split() -> None:
    wire = (
        b":42\r\n$5\r\nhello\r\n$0\r\n\r\n$-1\r\n*-1\r\n+OK\r\n-ERR boom\r\n"
        b"*3\r\n:1\r\n*1\r\n$4\r\na\r\nb\r\n:-7\r\n$2\r\n\r\n\r\n"
    )
    whole = Parser().feed(wire)
    assert whole[:6] == [42, b"hello", b"", None, None, b"OK"]
    assert isinstance(whole[6], ReplyError) and str(whole[6]) == "ERR boom"
    assert whole[7:] == [[1, [b"a\r\nb"], -7], b"\r\n"]  # a bulk string may hold CRLF
    for _ in range(50):  # cut at random points, down to single bytes
        parser, got, pos = Parser(), [], 0
        while pos < len(wire):
            step = random.randint(1, 7)
            got += parser.feed(wire[pos : pos + step])
            pos += step
        assert [str(r) if isinstance(r, RedisError) else r for r in got] == [
            str(r) if isinstance(r, RedisError) else r for r in whole
        ]


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert (
        encode(("SET", b"k", 1, 2.5, "é"))
        == b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$3\r\n2.5\r\n$2\r\n\xc3\xa9\r\n"
    )
    assert Parser().feed(encode(("EVALSHA", "x" * 40, 0))) == [[b"EVALSHA", b"x" * 40, b"0"]]
    with pytest.raises(TypeError):
        encode(("SET", None))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        Parser().feed(b"?what\r\n")
    with pytest.raises(ProtocolError):
        Parser().feed(b"$abc\r\n")


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (b"NOSCRIPT No matching script.", NoScript),
        (b"READONLY You can't write against a read only replica.", RedisUnavailable),
        (b"NOAUTH Authentication required.", RedisUnavailable),
        (b"WRONGPASS invalid username-password pair or user is disabled.", RedisUnavailable),
        (b"LOADING Redis is loading the dataset in memory", RedisUnavailable),
        (b"MASTERDOWN Link with MASTER is down", RedisUnavailable),
        (b"ERR max number of clients reached", RedisUnavailable),
        (b"WRONGTYPE Operation against a key holding the wrong kind of value", ReplyError),
        (b"ERR user_script:1: Script attempted to access nonexistent global variable 'x'", ReplyError),
    ],
)
def test_error_replies_are_unavailable_or_a_bug_as_coredis_classed_them(message: bytes, kind: type) -> None:
    [error] = Parser().feed(b"-" + message + b"\r\n")
    assert type(error) is kind
    assert isinstance(error, RedisUnavailable) == (kind is RedisUnavailable)


# --- URLs -------------------------------------------------------------------------------------------------


def test_the_url_forms_config_accepts() -> None:
    plain = parse_url("redis://10.0.0.5:6380/3")
    assert (plain.host, plain.port, plain.db, plain.password, plain.tls) == ("10.0.0.5", 6380, 3, None, None)
    assert plain.handshake() == [("SELECT", 3)]
    auth = parse_url("async+redis://app:p%40ss%3Aw0rd@redis.internal")
    assert (auth.host, auth.port, auth.db) == ("redis.internal", 6379, 0)
    assert auth.handshake() == [("AUTH", "app", "p@ss:w0rd")]
    assert "w0rd" not in repr(auth)
    assert parse_url("redis://:secret@h/0").handshake() == [("AUTH", "secret")]
    assert parse_url("redis://h:1?db=5").db == 5
    tls = parse_url("rediss://h:6390/1")
    assert isinstance(tls.tls, ssl.SSLContext) and tls.tls.verify_mode == ssl.CERT_REQUIRED and tls.tls.check_hostname
    loose = parse_url("rediss://h?ssl_cert_reqs=none").tls
    assert loose is not None and loose.verify_mode == ssl.CERT_NONE
    unix = parse_url("redis+unix://:pw@/run/redis/redis.sock?db=2")
    assert (unix.host, unix.path, unix.db, unix.handshake()) == (
        None,
        "/run/redis/redis.sock",
        2,
        [("AUTH", "pw"), ("SELECT", 2)],
    )
    for bad in ("http://h", "redis://:pw@/0", "redis://h/x", "redis+unix://", "rediss://h?ssl_cert_reqs=maybe"):
        with pytest.raises(ValueError):
            parse_url(bad)
    # A password with an unencoded "/", "#" or "?" breaks the URL; the message says so without quoting it.
    for leaky in ("redis://:Zq9/Yw7@h:1/0", "redis://:Zq9#Yw7@h/0", "redis://:Zq9?Yw7@h/0", "redis://h/Zq9Yw7"):
        with pytest.raises(ValueError, match="special characters") as bad_url:
            parse_url(leaky)
        assert "Zq9" not in str(bad_url.value) and "Yw7" not in str(bad_url.value)


def test_url_mistakes_are_one_reason_never_a_traceback_or_silently_ignored(tmp_path: Path) -> None:
    """A CA file that cannot be read was a FileNotFoundError traceback from `check-config`; an option bastion does
    not read (a typo, or a TLS option on a plain URL) was ignored, leaving TLS unverified or the wrong database."""
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    cases = {
        "rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem": "ssl_ca_certs=/nonexistent/ca.pem: cannot be read as CA",
        f"rediss://h/0?ssl_ca_certs={not_pem}": f"ssl_ca_certs={not_pem}: cannot be read as CA",
        "rediss://h/0?ssl_ca_cert=/etc/ca.pem": "has a query option bastion does not read",
        "redis://h/0?database=2": "has a query option bastion does not read",
        "redis://h/0?ssl_cert_reqs=required": "apply to TLS: write rediss://",
        "redis+unix:///run/redis.sock?ssl_ca_certs=/etc/ca.pem": "apply to TLS: write rediss://",
    }
    for url, reason in cases.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_url(url)
    with pytest.raises(ValueError) as leaky:  # an unencoded "?" in a password: the option's name is not echoed
        parse_url("redis://h/0?Zq9Yw7=1")
    assert "Zq9" not in str(leaky.value)


# --- the connection ---------------------------------------------------------------------------------------


async def test_a_reply_split_across_reads(client_for: Callable[[str, float], Redis]) -> None:
    async def slow(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        reply = b"*2\r\n$10\r\n1700000000\r\n:3\r\n"
        for i in range(len(reply)):
            writer.write(reply[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)

    async with FakeRedis(slow) as fake:
        assert await client_for(fake.url, 2.0).execute("EVALSHA", "x", 0) == [b"1700000000", 3]


async def test_many_concurrent_callers_each_get_their_own_reply(client_for: Callable[[str, float], Redis]) -> None:
    """400 calls in flight on one connection; the replies come back in one stream cut at random points, and
    each caller still gets the reply to its own command (matched in order)."""
    callers = 400
    held: list[bytes] = []

    async def batching(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        held.append(b"$%d\r\n%s\r\n" % (len(command[-1]), command[-1]))
        if len(held) < callers:
            return
        data, pos = b"".join(held), 0
        while pos < len(data):
            step = random.randint(1, 300)
            writer.write(data[pos : pos + step])
            await writer.drain()
            pos += step

    async with FakeRedis(batching) as fake:
        client = client_for(fake.url, 5.0)

        async def call(i: int) -> None:
            await asyncio.sleep(random.random() / 100)
            assert await client.execute("ECHO", f"caller-{i}") == f"caller-{i}".encode()

        await asyncio.gather(*(call(i) for i in range(callers)))
        assert fake.connections == 1  # one pipelined connection, opened once for all of them


async def test_one_loop_iterations_callers_share_one_write_in_order(client_for: Callable[[str, float], Redis]) -> None:
    """Auto-pipelining: 50 callers that issue in the same loop iteration leave in one send (counted on the
    client's socket), the server reads them in issue order, and each gets its own reply; callers of later
    iterations make writes of their own."""
    async with FakeRedis(echo()) as fake:
        client = client_for(fake.url, 2.0)
        assert client.issue(b"*1\r\n$4\r\nPING\r\n") is None  # no connection yet: `send` would open one
        assert await client.execute("ECHO", "warm") == b"warm"
        writes, commands = client.writes, client.commands
        replies = await asyncio.gather(*(client.execute("ECHO", f"c{i}") for i in range(50)))
        assert replies == [f"c{i}".encode() for i in range(50)]
        assert [c[-1] for c in fake.commands[-50:]] == [f"c{i}".encode() for i in range(50)]
        assert (client.writes - writes, client.commands - commands) == (1, 50)
        # `issue` queues without awaiting: two issued, then awaited, are one write too.
        first, second = client.issue(encode(("ECHO", "a"))), client.issue(encode(("ECHO", "b")))
        assert first is not None and second is not None
        assert (await first, await second) == (b"a", b"b")
        assert client.writes - writes == 2
        for i in range(3):  # one caller per iteration: one write each
            assert await client.execute("ECHO", str(i)) == str(i).encode()
        assert client.writes - writes == 5


async def test_a_failure_mid_batch_fails_exactly_the_callers_without_a_reply(
    client_for: Callable[[str, float], Redis],
) -> None:
    """One write of 10 commands; the server answers 4, then drops the connection: those 4 callers get their
    replies, the 6 others `RedisUnavailable` (nothing is re-sent), and the next call reconnects."""
    answered = 0

    async def partial(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        if command[-1].startswith(b"c") and answered == 4:
            await writer.drain()
            writer.transport.abort()
            return
        if command[-1].startswith(b"c"):
            answered += 1
        writer.write(b"$%d\r\n%s\r\n" % (len(command[-1]), command[-1]))

    async with FakeRedis(partial) as fake:
        client = client_for(fake.url, 2.0)
        assert await client.execute("ECHO", "warm") == b"warm"
        writes = client.writes
        results = await asyncio.gather(*(client.execute("ECHO", f"c{i}") for i in range(10)), return_exceptions=True)
        assert client.writes - writes == 1
        assert results[:4] == [b"c0", b"c1", b"c2", b"c3"]
        assert all(type(r) is RedisUnavailable for r in results[4:]), results
        assert await client.execute("ECHO", "again") == b"again" and fake.connections == 2
        assert client.writes - writes == 2  # the closed connection's writes still count


async def test_a_cancelled_caller_leaves_the_order_intact(client_for: Callable[[str, float], Redis]) -> None:
    async def delayed(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.02)
        writer.write(b"$%d\r\n%s\r\n" % (len(command[-1]), command[-1]))

    async with FakeRedis(delayed) as fake:
        client = client_for(fake.url, 2.0)
        first = asyncio.ensure_future(client.execute("ECHO", "a"))
        second = asyncio.ensure_future(client.execute("ECHO", "b"))
        await asyncio.sleep(0.005)
        first.cancel()
        assert await second == b"b"
        assert await client.execute("ECHO", "c") == b"c"
        assert fake.connections == 1


async def test_a_reply_that_never_comes_times_out_every_call_then_it_reconnects(
    client_for: Callable[[str, float], Redis],
) -> None:
    async def mute_then_echo(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if command[-1] != b"later":
            writer.write(b"$%d\r\n%s\r\n" % (len(command[-1]), command[-1]))

    async with FakeRedis(mute_then_echo) as fake:
        client = client_for(fake.url, 0.3)
        started = time.monotonic()
        results = await asyncio.gather(
            client.execute("ECHO", "later"), client.execute("ECHO", "later"), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, RedisTimeout) for r in results), results
        assert 0.25 <= elapsed < 1.5, elapsed
        assert isinstance(results[0], RedisUnavailable)  # what the limiter counts as "storage unavailable"
        assert await client.execute("ECHO", "now") == b"now"  # a fresh connection
        assert fake.connections == 2


async def test_a_connection_closed_mid_reply_fails_its_calls_then_it_reconnects(
    client_for: Callable[[str, float], Redis],
) -> None:
    async def cut(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if command[-1] == b"cut":
            writer.write(b"*2\r\n$10\r\n17000")
            await writer.drain()
            writer.transport.abort()
        else:
            writer.write(b"+OK\r\n")

    async with FakeRedis(cut) as fake:
        client = client_for(fake.url, 2.0)
        assert await client.execute("PING", "ok") == b"OK"
        results = await asyncio.gather(client.execute("X", "cut"), client.execute("X", "y"), return_exceptions=True)
        assert all(type(r) is RedisUnavailable for r in results), results
        assert await client.execute("PING", "ok") == b"OK"
        assert fake.connections == 2


async def test_refused_and_silent_servers_fail_within_the_timeout(client_for: Callable[[str, float], Redis]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        with pytest.raises(RedisUnavailable, match="cannot connect"):
            await client_for(f"redis://127.0.0.1:{port}/0", 2.0).execute("PING")

    async def silent(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with FakeRedis(silent) as fake:  # accepts, never answers AUTH: the connect timeout covers the handshake
        started = time.monotonic()
        with pytest.raises(RedisTimeout, match="could not connect"):
            await client_for(f"redis://:hunter2@127.0.0.1:{fake.port}/0", 0.3).execute("PING")
        assert time.monotonic() - started < 1.5
        assert fake.commands == [[b"AUTH", b"hunter2"]]


async def test_auth_and_select_open_the_session_and_a_refusal_never_echoes_the_password(
    client_for: Callable[[str, float], Redis],
) -> None:
    async def server(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if command[0] == b"AUTH":
            ok = command[1:] == [b"app", b"right"]
            writer.write(b"+OK\r\n" if ok else b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        else:
            writer.write(b"+OK\r\n")

    async with FakeRedis(server) as fake:
        assert await client_for(f"redis://app:right@127.0.0.1:{fake.port}/4", 2.0).execute("PING") == b"OK"
        assert fake.commands == [[b"AUTH", b"app", b"right"], [b"SELECT", b"4"], [b"PING"]]
        with pytest.raises(RedisUnavailable) as refused:
            await client_for(f"redis://app:wrong-pw@127.0.0.1:{fake.port}/4", 2.0).execute("PING")
        assert "WRONGPASS" in str(refused.value) and "wrong-pw" not in str(refused.value)


async def test_callers_arriving_while_it_connects_share_one_attempt(client_for: Callable[[str, float], Redis]) -> None:
    async with FakeRedis(echo()) as fake:
        client = client_for(fake.url, 2.0)
        replies = await asyncio.gather(*(client.execute("ECHO", str(i)) for i in range(50)))
        assert replies == [str(i).encode() for i in range(50)] and fake.connections == 1


async def test_noscript_loads_the_script_and_runs_it_once_more_on_the_same_connection(
    client_for: Callable[[str, float], Redis],
) -> None:
    loaded: set[bytes] = set()

    async def scripting(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if command[:2] == [b"SCRIPT", b"LOAD"]:
            sha = hashlib.sha1(command[2]).hexdigest().encode()  # noqa: S324 (Redis's name for a script)
            loaded.add(sha)
            writer.write(b"$40\r\n%s\r\n" % sha)
        elif command[0] == b"EVALSHA":
            writer.write(b":7\r\n" if command[1] in loaded else b"-NOSCRIPT No matching script.\r\n")
        else:
            writer.write(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")

    async with FakeRedis(scripting) as fake:
        client = client_for(fake.url, 2.0)
        script = client.script("return 7")
        assert await script(["k"], [1, 2.5]) == 7
        assert [c[0] for c in fake.commands] == [b"EVALSHA", b"SCRIPT", b"EVALSHA"]
        assert fake.commands[0][2:] == [b"1", b"k", b"1", b"2.5"]
        assert await script(["k"], []) == 7 and len(fake.commands) == 4  # cached now: one call
        with pytest.raises(ReplyError, match="WRONGTYPE") as bug:
            await client.execute("GET", "k")
        assert not isinstance(bug.value, RedisUnavailable)
        assert await script() == 7 and fake.connections == 1  # an error reply leaves the connection alone


async def test_a_pipeline_is_one_send_with_each_reply_or_error_in_place(
    client_for: Callable[[str, float], Redis],
) -> None:
    loaded: set[bytes] = set()

    async def server(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        if command[:2] == [b"SCRIPT", b"LOAD"]:
            loaded.add(hashlib.sha1(command[2]).hexdigest().encode())  # noqa: S324 (Redis's name for a script)
            writer.write(b"+OK\r\n")
        elif command[0] == b"EVALSHA":
            writer.write(b":%s\r\n" % command[-1] if command[1] in loaded else b"-NOSCRIPT No matching script.\r\n")
        elif command[0] == b"BAD":
            writer.write(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
        else:
            writer.write(b"+OK\r\n")

    async with FakeRedis(server) as fake:
        client = client_for(fake.url, 2.0)
        script = client.script("return ARGV[1]")
        replies = await client.pipeline(
            [(script.command(["k"], [1]), script), (b"*1\r\n$3\r\nBAD\r\n", None), (b"*1\r\n$2\r\nOK\r\n", None)]
        )
        assert replies[0] == 1 and isinstance(replies[1], ReplyError) and replies[2] == b"OK"
        # The script missed the cache: loaded, then run again after the others (which ran in one go).
        assert [c[0] for c in fake.commands] == [b"EVALSHA", b"BAD", b"OK", b"SCRIPT", b"EVALSHA"]
        assert await client.pipeline([(script.command([], [2]), script), (script.command([], [3]), script)]) == [2, 3]
    refused = Redis.from_url(f"redis://127.0.0.1:{fake.port}/0", 0.5)  # the server is gone now
    replies = await refused.pipeline([(b"*1\r\n$4\r\nPING\r\n", None)] * 2)
    assert all(isinstance(r, RedisUnavailable) for r in replies) and replies[0] is not replies[1]
    await refused.aclose()


async def test_a_closed_client_fails_waiting_calls(client_for: Callable[[str, float], Redis]) -> None:
    async def silent(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        pass

    async with FakeRedis(silent) as fake:
        client = client_for(fake.url, 5.0)
        waiting = asyncio.ensure_future(client.execute("PING"))
        await asyncio.sleep(0.05)
        await client.aclose()
        with pytest.raises(RedisUnavailable, match="closed"):
            await waiting


async def test_a_cancelled_pipeline_leaves_no_unretrieved_failures(client_for: Callable[[str, float], Redis]) -> None:
    """A request cancelled (its client went away) while its pipeline waits, then Redis fails: the calls it no
    longer waits for must not each log "Future exception was never retrieved" with a traceback."""
    import gc

    async def silent(command: list[bytes], writer: asyncio.StreamWriter) -> None:
        pass

    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        async with FakeRedis(silent) as fake:
            client = client_for(fake.url, 5.0)
            ping = b"*1\r\n$4\r\nPING\r\n"
            waiting = asyncio.ensure_future(client.pipeline([(ping, None)] * 3))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await client.aclose()  # every call still on the connection fails
            del waiting
            await asyncio.sleep(0)
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported


async def test_a_client_closed_as_its_connection_opens_leaves_no_socket_open(
    client_for: Callable[[str, float], Redis],
) -> None:
    """`aclose()` in the moment between the connection's set-up finishing and the client taking it: the
    connection must be closed, not kept by a closed client (a socket nobody closes)."""
    async with FakeRedis(echo()) as fake:
        client = client_for(fake.url, 2.0)
        call = asyncio.ensure_future(client.execute("ECHO", "x"))
        await asyncio.sleep(0)
        opening = client._opening
        assert opening is not None
        while not opening.done():  # noqa: ASYNC110 (the exact loop iteration it finishes in)
            await asyncio.sleep(0)
        await client.aclose()
        await asyncio.gather(call, return_exceptions=True)
        await asyncio.sleep(0.05)
        assert client._connection is None or client._connection.failure is not None
