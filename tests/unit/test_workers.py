"""The pieces of `bastion serve --workers N` that need no process: the engines' mirror, the line, the merged page."""

from __future__ import annotations

import asyncio
import io
import socket

from prometheus_client.parser import text_string_to_metric_families

from bastion.audit import AuditWriter
from bastion.config import Settings, load
from bastion.engine.router import Backend, EngineGroup, Replica, Router
from bastion.engine.state import Phase
from bastion.preflight import problems
from bastion.workers.channel import Channel
from bastion.workers.engines import UNSET_URL, EngineMirror, ReplicaState, snapshot
from bastion.workers.metrics import merge


def state(url: str, *, phase: str = "ready", draining: bool = False, key: str = "k1") -> ReplicaState:
    return ReplicaState("m/0", url, key, phase, "", 0, 5, draining, 0)


def mirrored() -> tuple[EngineMirror, Router, list[str]]:
    secrets: list[str] = []
    mirror = EngineMirror(secrets.append)
    replica = Replica(0, Backend(mirror.upstream("m/0"), "m/0"))
    router = Router((), default=EngineGroup("m", [replica]))
    mirror.attach(router)
    return mirror, router, secrets


def test_a_mirror_starts_not_ready_and_follows_the_masters_state() -> None:
    mirror, router, secrets = mirrored()
    [backend] = router.backends()
    assert backend.upstream.phase is Phase.STARTING and backend.upstream.base_url == UNSET_URL
    assert not backend.usable
    mirror.apply([state("http://127.0.0.1:7001")])
    assert router.backends() == [backend]  # the first address is not a new child
    assert backend.usable and backend.upstream.base_url == "http://127.0.0.1:7001"
    assert backend.upstream.api_key == "k1" and secrets == ["k1"]  # the engine's key is redacted from the logs
    mirror.apply([state("http://127.0.0.1:7001", phase="restarting")])
    assert not backend.usable and secrets == ["k1"]


def test_each_key_the_master_sends_reaches_every_listener() -> None:
    """The worker's log filter (given at construction) and its audit log (registered by create_app)."""
    mirror, _, secrets = mirrored()
    audited: list[str] = []
    mirror.tell_keys(audited.append)
    mirror.apply([state("http://127.0.0.1:7001")])
    mirror.apply([state("http://127.0.0.1:7002", key="k2")])  # a restarted child: a new key
    assert secrets == audited == ["k1", "k2"]


def test_a_new_child_gets_new_requests_while_the_old_one_reports_its_own_until_done() -> None:
    mirror, router, _ = mirrored()
    mirror.apply([state("http://127.0.0.1:7001")])
    [old] = router.backends()
    old.outstanding = 2  # two streams running on the first child
    mirror.apply([state("http://127.0.0.1:7002")])
    [new] = router.backends()
    assert new is not old and old.draining and new.usable
    new.outstanding = 1
    assert mirror.draining
    assert mirror.in_flight() == {"http://127.0.0.1:7002": 1, "http://127.0.0.1:7001": 2}
    old.outstanding = 0
    assert mirror.in_flight() == {"http://127.0.0.1:7002": 1, "http://127.0.0.1:7001": 0}
    assert mirror.in_flight() == {"http://127.0.0.1:7002": 1}  # reported at 0 once, then forgotten
    assert not mirror.draining


def test_the_masters_snapshot_leaves_external_engines_to_the_workers() -> None:
    mirror, router, _ = mirrored()
    mirror.apply([state("http://127.0.0.1:7001", draining=True)])
    assert snapshot(router) == (state("http://127.0.0.1:7001", draining=True),)
    router.backends()[0].upstream.phase = Phase.EXTERNAL
    assert snapshot(router) == ()


def test_the_line_carries_large_messages_both_ways_at_once() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        a, b = await Channel.open(ours), await Channel.open(theirs)
        page = "x" * (4 << 20)  # far past the socket buffers: a blocking send each way would deadlock
        a.send({"t": "page", "text": page})
        b.send({"t": "page", "text": page + "y"})
        got_b, got_a = await asyncio.wait_for(asyncio.gather(b.receive(), a.receive()), 10)
        assert got_b == {"t": "page", "text": page} and got_a == {"t": "page", "text": page + "y"}
        await a.close()
        assert await asyncio.wait_for(b.receive(), 5) is None  # the other end gone: None, not an exception
        await b.close()

    asyncio.run(main())


def test_worker_pages_merge_into_one_with_a_worker_label() -> None:
    page = (
        "# HELP bastion_requests_total Finished.\n# TYPE bastion_requests_total counter\n"
        'bastion_requests_total{status="200"} 3.0\n'
        '# HELP odd A family that already has the label.\n# TYPE odd gauge\nodd{worker="w"} 1.0\n'
    )
    text = merge([(1, page.replace("3.0", "4.0")), (0, page), (2, None)]).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("bastion_requests_total", (("status", "200"), ("worker", "0")))] == 3.0
    assert samples[("bastion_requests_total", (("status", "200"), ("worker", "1")))] == 4.0
    assert samples[("odd", (("exported_worker", "w"), ("worker", "0")))] == 1.0
    assert samples[("bastion_worker_scrape_up", (("worker", "2"),))] == 0.0  # no answer: visible, not a dip
    assert samples[("bastion_worker_scrape_up", (("worker", "0"),))] == 1.0
    assert text.count("# TYPE bastion_requests_total counter") == 1


class Writes(io.BytesIO):
    """Records each write's size (what a pipe would get in one system call)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sizes.append(len(data))
        return super().write(data)


def test_audit_lines_shared_by_workers_go_out_in_whole_lines_of_at_most_pipe_buf() -> None:
    lines = [f"{i:029d}\n" for i in range(10)]  # 30 bytes each

    async def written(max_write: int | None) -> Writes:
        stream = Writes()
        writer = AuditWriter(stream, max_write=max_write)
        for line in lines:  # finished in one loop iteration: flushed together at its end
            writer.write(line)
        await asyncio.sleep(0)
        assert stream.getvalue() == "".join(lines).encode()
        return stream

    assert asyncio.run(written(100)).sizes == [90, 90, 90, 30]  # three lines per write, never a line cut
    assert asyncio.run(written(None)).sizes == [300]  # one process: one write per flush, as before


def test_several_workers_refuse_what_one_process_alone_can_count() -> None:
    base = {"upstream_url": "http://127.0.0.1:9", "audit_log": "off"}
    alone = load(Settings, {**base, "workers": 1, "fairness": True}, env_file=None)
    assert problems(alone) == []
    shared = load(Settings, {**base, "workers": 3, "redis_url": "redis://127.0.0.1:6379/0"}, env_file=None)
    assert problems(shared) == []
    lines = problems(load(Settings, {**base, "workers": 3, "fairness": True}, env_file=None))
    assert len(lines) == 2
    assert lines[0].startswith("BASTION_WORKERS=3 needs BASTION_REDIS_URL") and "BASTION_WORKERS=1" in lines[0]
    assert lines[1].startswith("BASTION_WORKERS=3 cannot run with BASTION_FAIRNESS")
    assert "BASTION_FAIRNESS=false" in lines[1]
