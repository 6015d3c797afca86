"""The docs, tried as a new user would: README blocks pasted whole, troubleshooting's claims against real processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support import TEST_KEY, free_port, gateway

ROOT = Path(__file__).parents[2]


def doc_block(heading: str, doc: str = "README.md") -> str:
    """The first ```bash block after `heading` in `doc`."""
    text = (ROOT / doc).read_text()
    after = text[text.index(heading) :]
    match = re.search(r"```bash\n(.*?)```", after, re.DOTALL)
    assert match is not None, heading
    return match.group(1)


def run_pasted(block: str, cwd: Path, port: int, timeout: float = 90) -> str:
    """`block` as a user pastes it into bash (-e, pipefail), on `port` instead of 8000; its output, status 0."""
    block = block.replace("localhost:8000", f"localhost:{port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "VLLM_"))}
    env["BASTION_PORT"] = str(port)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `bastion` as installed
    shell = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", block],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = shell.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)  # the gateway and its simulator, if the block did not stop them
    assert shell.returncode == 0, output
    return output


def test_the_api_keys_block_of_the_readme_runs_as_pasted(tmp_path: Path) -> None:
    """Creates a key, starts a gateway over the simulator, waits for it, calls it, lists, rotates, revokes, stops."""
    # `make demo` made .venv in the checkout; here, one whose bin is the interpreter running the tests.
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    output = run_pasted(doc_block("### API keys"), tmp_path, free_port())
    assert '"id":"qwen2.5-7b-instruct"' in output.replace(" ", ""), output
    assert re.search(r"^\w+ +bst-\w+_… +alice +active ", output, re.MULTILINE), output
    assert "rotated key" in output and "revoked key" in output
    assert (tmp_path / "keys.json").exists()


def test_the_two_models_block_of_engines_md_runs_as_pasted(tmp_path: Path) -> None:
    """Its curl lines ran before the gateway listened: every one printed nothing (curl -s, connection refused)."""
    output = run_pasted(doc_block("## Two models", "docs/engines.md"), tmp_path, free_port())
    compact = output.replace(" ", "")
    assert '{"status":"ready","engines":{"chat":{' in compact and '"code":{"ready":1' in compact, output
    assert '"id":"chat"' in compact and '"id":"code"' in compact, output
    assert '"object":"chat.completion","created":' in compact and '"model":"code"' in compact, output
    assert '"code":"model_not_found"' in compact, output


def test_the_rolling_restart_block_of_engines_md_runs_as_pasted(tmp_path: Path) -> None:
    output = run_pasted(doc_block("## Two replicas", "docs/engines.md"), tmp_path, free_port())
    assert '"chat":{"ready":2,"replicas":[' in output.replace(" ", ""), output
    printed = re.findall(r"^(chat/\d): restarted \(", output, re.MULTILINE)  # by the CLI, one line per replica
    assert printed == ["chat/0", "chat/1", "chat/1"], output
    assert "SIGUSR1: rolling restart of every engine" in output, output


@contextlib.contextmanager
def stalling_stream() -> Iterator[int]:
    """An upstream that answers a stream with its head and one chunk, then stays silent."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    chunk = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    chunk += b'"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            stop.wait(10)  # silent until the test ends

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(5)


def test_a_streamed_upstream_timeout_is_a_200_ending_with_an_error_event() -> None:
    """docs/troubleshooting.md: the chunks that came, then `data: {"error": ...}`; the SDK raises APIError."""
    with (
        stalling_stream() as port,
        gateway(
            "--upstream-url", f"http://127.0.0.1:{port}", env={"BASTION_UPSTREAM_READ_TIMEOUT": "0.5"}, ready=False
        ) as (_, base),
    ):
        client = openai.OpenAI(base_url=base + "/v1", api_key=TEST_KEY, max_retries=0)
        with client.chat.completions.with_streaming_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as raw:
            assert raw.status_code == 200
            body = b"".join(raw.iter_bytes())
        assert body.endswith(
            b'data: {"error":{"message":"The model server did not answer in time.","type":"timeout_error",'
            b'"param":null,"code":"upstream_timeout"}}\n\n'
        ), body
        assert b"[DONE]" not in body
        seen = []
        with pytest.raises(openai.APIError, match=r"The model server did not answer in time\."):
            for event in client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                seen.append(event.choices[0].delta.content)
        assert seen == ["Hel"]
