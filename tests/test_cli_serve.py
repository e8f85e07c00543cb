"""`edgepipe serve` from the command line: registration, import boundaries, graceful stop, logs."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from edgepipe.cli.main import build_parser
from tests.fixtures.layout import scan

REPO = Path(__file__).resolve().parents[1]
START_S = 60.0


def test_serve_is_a_registered_command():
    args = build_parser().parse_args(["serve", "art", "--parallel", "2", "--max-queue", "3"])
    assert args.command == "serve" and args.parallel == 2 and args.max_queue == 3
    assert args.host == "127.0.0.1"  # loopback unless asked


def test_speculative_flag_sets_the_server_default_and_refuses_unknown_modes(tmp_path, capsys):
    from edgepipe.cli.serve import cmd_serve, config_from_args
    from edgepipe.serve.config import ServeConfig, read_api_keys

    args = build_parser().parse_args(["serve", str(tmp_path), "--speculative", "ngram"])
    assert config_from_args(args, ServeConfig, read_api_keys).speculative == "ngram"
    args = build_parser().parse_args(["serve", str(tmp_path)])
    assert config_from_args(args, ServeConfig, read_api_keys).speculative is None
    args = build_parser().parse_args(["serve", str(tmp_path), "--speculative", "medusa"])
    assert cmd_serve(args) == 2
    assert "--speculative must be one of ('ngram',)" in capsys.readouterr().err


def test_the_cli_and_the_runtime_never_import_the_server():
    code = (
        "import sys, edgepipe.cli.main, edgepipe.runtime\n"
        "bad = [m for m in sys.modules if m.startswith('edgepipe.serve') or "
        "m.split('.')[0] in ('starlette', 'uvicorn', 'prometheus_client')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_server_imports_only_the_runtime_of_edgepipe():
    modules = scan(REPO, ("edgepipe",))
    bad = [
        (name, edge.target)
        for name, module in modules.items()
        if name.startswith("edgepipe.serve")
        for edge in module.imports
        if edge.target and not edge.target.startswith(("edgepipe.serve", "edgepipe.runtime"))
    ]
    assert bad == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_the_stream_finish_exits_0_and_logs_json_without_the_key(
    serve_toy_dir, tmp_path
):
    keys = tmp_path / "keys.txt"
    keys.write_text("ci: sk-secret-value\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgepipe.cli.main",
            "serve",
            str(serve_toy_dir),
            "--port",
            str(port),
            "--api-key-file",
            str(keys),
            "--model-name",
            "toy",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        lines, first = [], threading.Event()

        def read():
            body = {"model": "toy", "prompt": "Hello", "max_tokens": 200, "stream": True}
            headers = {"Authorization": "Bearer sk-secret-value"}
            with httpx.stream(
                "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60
            ) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(START_S)
        proc.send_signal(signal.SIGTERM)
        reader.join(START_S)
        assert proc.wait(START_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines[-1] == "data: [DONE]"
    stderr = proc.stderr.read()
    assert "sk-secret-value" not in stderr
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    (entry,) = [e for e in logs if e.get("endpoint") == "/v1/completions"]
    assert entry["key"] == "ci" and entry["status"] == 200 and entry["completion_tokens"] >= 1
