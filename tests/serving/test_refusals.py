"""What ``toolkit serve`` refuses before it serves (one ``error:`` line, exit 2) and the 503s of admission
control, called on the app in-process (no socket: ASGI messages in and out)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.test_scheduler import folder  # noqa: F401  (the tiny export, built once per module)
from toolkit import cli
from toolkit.serving.app import Server, create_app
from toolkit.serving.config import ServeConfig


@pytest.mark.parametrize(("options", "message"), [
    (["--max-batch", "0"], "--max-batch must be >= 1 and --max-queue >= 0 (got 0, 64)"),
    (["--max-queue", "-1"], "--max-batch must be >= 1 and --max-queue >= 0 (got 8, -1)"),
    (["--port", "70000"], "--port must be in [0, 65535] (got 70000)"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout must be >= 0 seconds (got nan)"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0 seconds (got -1.0)"),
    (["--threads", "0"], "--threads must be >= 1 (got 0)"),
])
def test_bad_settings_are_refused_in_one_line(folder: Path, capsys: pytest.CaptureFixture[str], options: list[str],  # noqa: F811
                                              message: str) -> None:
    assert cli.main(["serve", str(folder), *options]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_folder_that_is_no_export_is_refused_before_the_port_is_taken(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} holds no model.onnx: give the folder an ONNX export was written to\n"
    (tmp_path / "model.onnx").write_bytes(b"junk")
    assert cli.main(["serve", str(tmp_path)]) == 2
    assert "it is not an export folder" in capsys.readouterr().err


def test_a_port_in_use_is_one_line(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(folder), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port} (") and "choose another --port" in err


def test_an_export_that_fails_to_load_stops_the_server_with_one_line(folder: Path, tmp_path: Path) -> None:  # noqa: F811
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.onnx").write_bytes(b"not a graph")
    done = subprocess.run([sys.executable, "-m", "toolkit", "serve", str(broken), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    line, = done.stderr.splitlines()
    assert line.startswith("error: ") and "Traceback" not in done.stderr


# --- admission control, in-process -----------------------------------------------------------------------
def call(server: Server, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], dict]:
    """One request through the ASGI app (its lifespan not run: the export is never loaded)."""
    app, sent = create_app(server), []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 0), "client": ("127.0.0.1", 1), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(content) if content else {}


BODY = json.dumps({"model": "tiny", "prompt": "hi"}).encode()


def test_503_while_loading_shutting_down_or_full(folder: Path) -> None:  # noqa: F811
    server = Server(ServeConfig(folder, max_batch=2, max_queue=3, served_model_name="tiny"))
    status, _, _ = call(server, "GET", "/health")
    assert status == 503
    status, headers, body = call(server, "POST", "/v1/completions", BODY)
    assert (status, headers["retry-after"]) == (503, "1") and "still loading" in body["error"]["message"]

    server.engine = object()  # type: ignore[assignment]  # loaded, as far as admission is concerned
    server.loop = object()  # type: ignore[assignment]
    assert call(server, "GET", "/health")[0] == 200
    server.admitted = 5  # 2 running + 3 queued: the next one is refused before its body is read
    status, headers, body = call(server, "POST", "/v1/completions", b"{not even json")
    assert (status, headers["retry-after"]) == (503, "1")
    assert body["error"]["message"] == "2 requests running and 3 waiting (--max-queue): retry later"
    assert server.admitted == 5
    server.admitted, server.draining = 0, True
    status, headers, body = call(server, "POST", "/v1/chat/completions", BODY)
    assert (status, headers["retry-after"]) == (503, "1") and "shutting down" in body["error"]["message"]
