"""End-to-end fixtures: the real Envoy 1.40 with the built filter, the sidecar and minifugu, all on
loopback with free ports, every process stopped by PID at the end. Run through `make test-e2e`,
which installs the tools and builds the filter and the sidecar first."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
ENVOY = TOOLS / "venv" / "bin" / "envoy"
MINIFUGU = TOOLS / "bin" / "minifugu"
SIDECAR = ROOT / "target" / "release" / "hevlayer-sidecar"
FILTER = Path(os.environ.get("HEVLAYER_FILTER_WASM", ROOT / "target/wasm32-wasip1/release/hevlayer_filter.wasm"))
AUTH = {"authorization": "Bearer e2e-key"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {seconds}s")


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Processes:
    """Starts processes with logs in a folder and stops them all, by PID, at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs = {}

    def start(self, name, argv, env=None):
        for tool in (argv[0],):
            if not Path(tool).exists():
                pytest.exit(f"{tool} is missing: run `make test-e2e` (it installs and builds what it needs)", 2)
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.procs[name] = proc
        return proc

    def stop(self, name):
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


class Gateway:
    """One Envoy with the filter in front of `upstream_url`, plus the shared sidecar port."""

    def __init__(self, procs, name, upstream_url, sidecar_port, port=None, **env):
        self.port, self.admin = port or free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = procs.logs / f"{name}.yaml"
        render_env = {
            "GATEWAY_PORT": str(self.port),
            "ADMIN_PORT": str(self.admin),
            "SIDECAR_PORT": str(sidecar_port),
            "TURBOPUFFER_URL": upstream_url,
            "FILTER_WASM": str(FILTER),
            "ACCESS_LOG": str(procs.logs / f"{name}-access.log"),
            "TURBOPUFFER_API_KEY": "",
            **env,
        }
        subprocess.run(
            [sys.executable, str(ROOT / "envoy/render.py"), "--profile", "local", "--out", str(config)],
            check=True,
            env={**os.environ, **render_env},
        )
        procs.start(name, [str(ENVOY), "-c", str(config), "--concurrency", "1", "--base-id", str(self.admin)])
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.admin}/ready").status_code == 200, f"envoy {name}")

    def counter(self, name):
        text = httpx.get(f"http://127.0.0.1:{self.admin}/stats", params={"filter": name}).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key.endswith(name):
                return int(value)
        return 0


class Recorder(http.server.ThreadingHTTPServer):
    """A Turbopuffer stand-in that records requests and misbehaves on demand, chosen by namespace:
    hang (never answers within the test's patience), busy (429 + retry-after), conflict (a failed
    conditional write), anything else 200 with affected ids."""

    daemon_threads = True

    def __init__(self):
        self.requests = []
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class RecorderHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _send(self, status, body, headers=()):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        body = self._body()
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        ns = self.path.split("?")[0].rstrip("/").split("/")[-1]
        if ns == "hang":
            time.sleep(4)
            return self._send(200, {"status": "OK"})
        if ns == "busy":
            return self._send(429, {"status": "error", "error": "slow down"}, [("retry-after", "7"), ("x-request-id", "up-1")])
        if ns == "conflict":
            return self._send(409, {"status": "error", "error": "condition failed for 1 document"})
        return self._send(200, {"status": "OK", "message": "ok", "rows_affected": 1, "upserted_ids": [1],
                                "deleted_ids": [2], "billing": {}})

    do_DELETE = do_POST
    do_GET = do_POST


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """minifugu + sidecar + gateway (passthrough), and a second gateway in front of the recorder."""
    logs = tmp_path_factory.mktemp("e2e-logs")
    procs = Processes(logs)
    recorder = Recorder()
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    try:
        mf_port, sc_port = free_port(), free_port()
        procs.start("minifugu", [str(MINIFUGU)], env={"MINIFUGU_LISTEN": f"127.0.0.1:{mf_port}"})
        wait_until(lambda: port_open(mf_port), "minifugu")
        gateway_port = free_port()
        procs.start(
            "sidecar",
            [str(SIDECAR), "--listen", f"127.0.0.1:{sc_port}", "--gateway-url", f"http://127.0.0.1:{gateway_port}",
             "--log-json", "false"],
        )
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{sc_port}/healthz").status_code == 200, "sidecar")
        # The sidecar sends pipeline vectors and fetch misses through this gateway.
        main = Gateway(procs, "envoy-main", f"http://127.0.0.1:{mf_port}", sc_port, port=gateway_port)
        recorded = Gateway(procs, "envoy-recorder", recorder.url, sc_port, ROUTE_TIMEOUT="1s")
        yield {
            "procs": procs,
            "main": main,
            "recorded": recorded,
            "recorder": recorder,
            "minifugu": f"http://127.0.0.1:{mf_port}",
            "sidecar_port": sc_port,
            "logs": logs,
        }
    finally:
        procs.stop_all()
        recorder.shutdown()
