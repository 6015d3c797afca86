"""The lean Redis client against a real redis-server: AUTH, SELECT, a Unix socket, TLS, restarts, error replies."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from bastion.ratelimit import RateLimited, RateLimiter
from bastion.ratelimit.limiter import per_minute
from bastion.redisio import Redis, RedisUnavailable, ReplyError
from tests.support import free_port, make_cert, redis_server


async def test_auth_with_user_and_password_and_select_on_a_real_server() -> None:
    with redis_server("--requirepass", "s3cret", "--user", "app", "on", ">app-pw", "~*", "+@all") as (_, url):
        port = url.rsplit(":", 1)[1].split("/")[0]
        default = Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/2", 2.0)
        named = Redis.from_url(f"redis://app:app-pw@127.0.0.1:{port}/2", 2.0)
        other_db = Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/0", 2.0)
        anonymous = Redis.from_url(f"redis://127.0.0.1:{port}/0", 2.0)
        wrong = Redis.from_url(f"redis://:nope@127.0.0.1:{port}/0", 2.0)
        try:
            assert await default.execute("SET", "k", "v") == b"OK"
            assert await named.execute("GET", "k") == b"v"  # same db 2
            assert await other_db.execute("GET", "k") is None
            with pytest.raises(RedisUnavailable, match="NOAUTH"):
                await anonymous.execute("GET", "k")
            with pytest.raises(RedisUnavailable, match="WRONGPASS") as refused:
                await wrong.execute("GET", "k")
            assert "nope" not in str(refused.value)
        finally:
            for client in (default, named, other_db, anonymous, wrong):
                await client.aclose()


async def test_a_unix_socket_url() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "redis.sock")
        with redis_server("--unixsocket", sock, "--unixsocketperm", "700"):
            client = Redis.from_url(f"redis+unix://{sock}?db=3", 2.0)
            try:
                assert await client.execute("SET", "k", "unix") == b"OK"
                assert await client.execute("INFO", "keyspace") is not None
                assert b"db3:keys=1" in await client.execute("INFO", "keyspace")  # type: ignore[operator]
            finally:
                await client.aclose()


async def test_rediss_with_a_ca_file() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(Path(tmp))
        tls_port = free_port()
        args = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        with redis_server(*args, "--tls-auth-clients", "no"):
            trusted = Redis.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}", 2.0)
            untrusted = Redis.from_url(f"rediss://127.0.0.1:{tls_port}/0", 2.0)
            try:
                assert await trusted.execute("PING") == b"PONG"
                with pytest.raises(RedisUnavailable, match="cannot connect"):
                    await untrusted.execute("PING")  # a certificate no system CA signed
            finally:
                await trusted.aclose()
                await untrusted.aclose()


async def test_scripts_survive_a_flush_and_a_restart_and_the_client_reconnects() -> None:
    port = free_port()
    with redis_server(port=port) as (_, url):
        client = Redis.from_url(url, 2.0)
        script = client.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        assert await script(["n"], [2]) == 2
        await client.execute("SCRIPT", "FLUSH")
        assert await asyncio.gather(*(script(["n"], [1]) for _ in range(50))) is not None  # all missed the cache
        assert await client.execute("GET", "n") == b"52"
    with pytest.raises(RedisUnavailable):  # the server is gone
        await script(["n"], [1])
    with redis_server(port=port):  # a new, empty server on the same port: reconnect, reload, run
        assert await script(["n"], [5]) == 5
        await client.aclose()


async def test_error_replies_from_a_real_server() -> None:
    with redis_server() as (_, url):
        port = url.rsplit(":", 1)[1].split("/")[0]
        client = Redis.from_url(url, 2.0)
        try:
            await client.execute("SET", "s", "text")
            with pytest.raises(ReplyError, match="WRONGTYPE"):
                await client.execute("LPUSH", "s", "x")
            with pytest.raises(ReplyError, match=r"attempt to compare|user_script") as bug:
                await client.script("return 1 < {}")()
            assert not isinstance(bug.value, RedisUnavailable)
            assert await client.execute("PING") == b"PONG"  # the connection is still fine
        finally:
            await client.aclose()
        with redis_server("--replicaof", "127.0.0.1", port) as (_, replica_url):
            replica = Redis.from_url(replica_url, 2.0)
            try:
                with pytest.raises(RedisUnavailable, match="READONLY"):
                    await replica.execute("SET", "k", "v")
                with pytest.raises(RedisUnavailable, match="READONLY"):  # a script that writes, as the limits' do
                    await replica.script("return redis.call('INCR', KEYS[1])")(["k"])
            finally:
                await replica.aclose()


async def test_the_limiter_on_a_replica_or_without_its_password_fails_open_or_closed() -> None:
    with redis_server("--requirepass", "pw") as (_, url):
        port = url.rsplit(":", 1)[1].split("/")[0]
        clients = [Redis.from_url(f"redis://{auth}127.0.0.1:{port}/0", 0.5) for auth in ("", ":bad@", ":pw@")]
        limiter = RateLimiter(rpm=5, tpm=100, max_concurrent=2, redis=clients[0])
        admission = await limiter.admit(None, "10.0.0.1", tokens=10)
        assert admission.headers == [] and limiter.storage_errors == 1 and limiter.fail_open_admissions == 1
        closed = RateLimiter(rpm=5, tpm=100, max_concurrent=2, redis=clients[1], fail_open=False)
        with pytest.raises(RateLimited) as refused:
            await closed.admit(None, "10.0.0.1", tokens=10)
        assert refused.value.status == 503
        good = RateLimiter(rpm=5, tpm=100, max_concurrent=2, redis=clients[2])
        async with good.service():
            admission = await good.admit(None, "10.0.0.1", tokens=10)
            assert admission.slot is not None and len(admission.headers) == 6
            assert dict(admission.headers)[b"x-ratelimit-remaining-requests"] == b"4"
            await good.finish(admission, 4)  # the slot back and 6 tokens refunded, in one round trip
            window = await good.token_windows.reserve(per_minute(100).key_for("ip:10.0.0.1"), 100, 60, 0)
            assert (window.window.previous, window.window.current) == (0, 4)
            assert await good.slots.acquire("ip:10.0.0.1", 1) is not None  # the only slot is free again
        for client in clients:
            await client.aclose()
