"""End-to-end fixtures: the real Envoy 1.40 with the built filter, the sidecar and minifugu, all on
loopback with free ports, every process stopped by PID at the end. Run through `make test-e2e`,
which installs the tools and builds the filter and the sidecar first.

`stack`: passthrough gateways in front of minifugu and of the recording stand-in upstream.
`keys_stack`: a `keys`-mode gateway in front of its own recorder, its sidecar behind a recording tap."""

import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
ENVOY = TOOLS / "venv" / "bin" / "envoy"
MINIFUGU = TOOLS / "bin" / "minifugu"
# Longer than the filter's refresh period (`watermark_refresh_ms`, 500 ms by default) plus a
# linger (2 ms): the refresh tick records the counter increments a worker added up.
COUNTER_FLUSH_WAIT_S = 0.7
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
            # Whatever the calling shell exports, a gateway is passthrough unless a test says otherwise.
            "TURBOPUFFER_API_KEY": "",
            "AUTH_MODE": "passthrough",
            "GATEWAY_KEYS": "",
            **env,
        }
        subprocess.run(
            [sys.executable, str(ROOT / "envoy/render.py"), "--profile", "local", "--out", str(config)],
            check=True,
            env={**os.environ, **render_env},
        )
        procs.start(name, [str(ENVOY), "-c", str(config), "--concurrency", "1", "--base-id", str(self.admin)])
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.admin}/ready").status_code == 200, f"envoy {name}")

    def counters(self):
        """The filter's counters by name (`hevlayer.x`; Envoy lists them as `wasmcustom.hevlayer.x`).
        Each worker adds its increments up and records them at its next tick (every
        `watermark_refresh_ms`, 500 ms here), so this waits for one first."""
        time.sleep(COUNTER_FLUSH_WAIT_S)
        text = httpx.get(f"http://127.0.0.1:{self.admin}/stats", params={"filter": r"^wasmcustom\.hevlayer\."}).text
        found = {}
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            found[key.removeprefix("wasmcustom.")] = int(value)
        return found

    def counter(self, name):
        counters = self.counters()
        if name not in counters:
            raise KeyError(f"Envoy shows no counter {name!r}; it has {sorted(counters)}")
        return counters[name]


def default_interrupts():
    """`preexec_fn` for a script the tests stop with Ctrl-C: SIGINT and SIGQUIT at their defaults,
    as a terminal's shell starts a job. A runner started in the background (`cmd &` without job
    control) hands them down ignored, and a shell cannot trap a signal ignored when it starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


class Recorded(NamedTuple):
    """One request as a stand-in server received it. `headers` keeps repeated headers
    (`headers.get_all(name)`) and looks names up case-insensitively."""

    method: str
    path: str
    headers: http.client.HTTPMessage
    body: bytes


# The stand-in Turbopuffer's answer to any request on namespace "busy": a throttle with every
# header a client acts on (SPEC §1), so a test can check each one is relayed.
BUSY_BODY = json.dumps({"status": "error", "error": "slow down"}).encode()
BUSY_HEADERS = {"retry-after": "7", "retry-after-ms": "7000", "x-request-id": "up-1", "x-should-retry": "true"}


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Envoy gives up on a request that hangs (route timeout) and closes the connection: the
        # late answer then fails to write. That is the test working, not a fault.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class Recorder(QuietServer):
    """A Turbopuffer stand-in that records requests and misbehaves on demand, chosen by namespace
    (the path segment after `namespaces`, else the last one): hang (never answers within the
    test's patience), busy (429 with BUSY_HEADERS), conflict (a failed conditional write). A query
    filtering on one id answers that row; anything else 200 with affected ids."""

    def __init__(self):
        self.requests: list[Recorded] = []
        # The sidecar's watermark polls (namespace metadata, told apart by the sidecar's
        # user-agent) are kept apart from the requests a test sends, and answered with the index
        # status a test sets per namespace.
        self.metadata_polls: list[Recorded] = []
        self.index_status: dict[str, str] = {}
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def since(self, mark):
        return self.requests[mark:]


def read_body(handler):
    if handler.headers.get("transfer-encoding", "").lower() == "chunked":
        data = bytearray()
        while True:
            size = int(handler.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                handler.rfile.readline()
                return bytes(data)
            data += handler.rfile.read(size)
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("content-length") or 0))


def namespace_of(segments):
    """The segment after `namespaces` (`/v2/namespaces/hang/query` is namespace "hang"), else the last."""
    if "namespaces" in segments[:-1]:
        return segments[segments.index("namespaces") + 1]
    return segments[-1] if segments else ""


class RecorderHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body, headers=()):
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        body = read_body(self)
        segments = [s for s in self.path.split("?")[0].split("/") if s]
        ns = namespace_of(segments)
        if self.command == "GET" and segments[-1:] == ["metadata"] and \
                self.headers.get("user-agent", "").startswith("hevlayer-sidecar/"):
            self.server.metadata_polls.append(Recorded(self.command, self.path, self.headers, body))
            status = self.server.index_status.get(ns, "up-to-date")
            return self._send(200, {"approx_row_count": 0, "index": {"status": status}})
        self.server.requests.append(Recorded(self.command, self.path, self.headers, body))
        if ns == "hang":
            time.sleep(4)
            return self._send(200, {"status": "OK"})
        if ns == "busy":
            return self._send(429, BUSY_BODY, list(BUSY_HEADERS.items()))
        if ns == "conflict":
            return self._send(409, {"status": "error", "error": "condition failed for 1 document"})
        if segments[-1:] == ["query"]:
            query = json.loads(body or b"{}")
            match query.get("filters"):
                case ["id", "Eq", doc_id]:
                    return self._send(200, {"rows": [{"id": doc_id, "source": "recorder"}], "billing": {}})
            return self._send(200, {"rows": [], "billing": {}})
        return self._send(200, {"status": "OK", "message": "ok", "rows_affected": 1, "upserted_ids": [1],
                                "deleted_ids": [2], "billing": {}})

    do_DELETE = do_POST
    do_GET = do_POST
    do_PUT = do_POST


# The filter's mirror and watermark callout paths (filter/src/sidecar_api.rs).
MIRROR_PATH = "/internal/v1/mirror"
EVICT_PATH = "/internal/v1/evict"
WATERMARKS_PATH = "/internal/v1/watermarks"

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer"}


class SidecarTap(QuietServer):
    """A recording reverse proxy in front of a sidecar: Envoy's callouts (pipeline routes, fetches,
    mirrors) pass through it, so a test sees exactly what the sidecar was sent."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.requests: list[Recorded] = []
        # The filter's watermark registrations (on a timer, not caused by any one request).
        self.registrations: list[Recorded] = []
        # A test may make the "sidecar" misbehave on mirror callouts (or on the callouts under
        # `fault_path`): ("delay", seconds) answers 200 only after that long, ("status", code)
        # answers that status at once; neither forwards.
        self.mirror_fault = None
        self.fault_path = MIRROR_PATH
        super().__init__(("127.0.0.1", 0), TapHandler)
        self.port = self.server_address[1]


class TapHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _relay(self):
        body = read_body(self)
        recorded = Recorded(self.command, self.path, self.headers, body)
        if self.path.startswith(WATERMARKS_PATH):
            self.server.registrations.append(recorded)
        else:
            self.server.requests.append(recorded)
        fault = self.server.mirror_fault
        if fault and self.path.startswith(self.server.fault_path):
            kind, value = fault
            if kind == "delay":
                time.sleep(value)
            payload = b'{"error":"internal_error","message":"injected by the test"}' if kind == "status" else b"{}"
            self.send_response_only(value if kind == "status" else 200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=30)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.putheader("content-length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response_only(response.status)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _relay


def start_sidecar(procs, name, port, gateway_port, **env):
    """A sidecar on `port` that sends Turbopuffer requests through the Envoy listener on `gateway_port`."""
    procs.start(
        name,
        [str(SIDECAR), "--listen", f"127.0.0.1:{port}", "--gateway-url", f"http://127.0.0.1:{gateway_port}",
         "--log-json", "false"],
        env=env,
    )
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, name)


def read_until(proc, marker, seconds=60.0):
    """Output of `proc` (started with text stdout piped) up to the line holding `marker`; fails if it
    exits or takes too long."""
    deadline = time.monotonic() + seconds
    seen = []
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            if marker in line:
                return "".join(seen)
            continue
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited {proc.returncode} before '{marker}':\n{''.join(seen)}")
        time.sleep(0.05)
    raise AssertionError(f"no '{marker}' from {proc.args[0]} within {seconds}s:\n{''.join(seen)}")


def serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_server(server):
    server.shutdown()
    server.server_close()


def raw_request(port, data: bytes, timeout=10):
    """Sends raw bytes on a fresh connection and reads one HTTP/1.1 response whole:
    (status, headers with lower-case names, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before a whole response head: {received!r}")
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """minifugu + sidecar + gateway (passthrough), and a second gateway in front of the recorder
    with its own sidecar (whose pipeline writes and fetch misses go through that gateway, so the
    recorder sees them)."""
    logs = tmp_path_factory.mktemp("e2e-logs")
    procs = Processes(logs)
    recorder = serve(Recorder())
    try:
        mf_port, sc_port, rec_sc_port = free_port(), free_port(), free_port()
        procs.start("minifugu", [str(MINIFUGU)], env={"MINIFUGU_LISTEN": f"127.0.0.1:{mf_port}"})
        wait_until(lambda: port_open(mf_port), "minifugu")
        gateway_port, recorded_port = free_port(), free_port()
        # The sidecar sends pipeline vectors and fetch misses through this gateway.
        start_sidecar(procs, "sidecar", sc_port, gateway_port)
        start_sidecar(procs, "sidecar-recorder", rec_sc_port, recorded_port)
        main = Gateway(procs, "envoy-main", f"http://127.0.0.1:{mf_port}", sc_port, port=gateway_port)
        recorded = Gateway(procs, "envoy-recorder", recorder.url, rec_sc_port, port=recorded_port, ROUTE_TIMEOUT="1s")
        yield {
            "procs": procs,
            "main": main,
            "recorded": recorded,
            "recorder": recorder,
            "minifugu": f"http://127.0.0.1:{mf_port}",
            "sidecar_port": sc_port,
            "recorder_sidecar_port": rec_sc_port,
            "logs": logs,
        }
    finally:
        procs.stop_all()
        stop_server(recorder)


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="session")
def keys_stack(tmp_path_factory):
    """A gateway in `keys` mode in front of the recorder, with its own sidecar behind a recording
    tap. The callers hold one key per scope; the sidecar holds its own admin key (it reads on
    fetch misses and writes pipeline vectors, and `write` does not imply `read`); Turbopuffer gets
    the upstream key."""
    run = uuid.uuid4().hex[:12]
    keys = {scope: f"caller-{scope}-{run}" for scope in ("read", "write", "admin")}
    sidecar_key, upstream_key = f"sidecar-admin-{run}", f"tpuf-upstream-{run}"
    gateway_keys = ",".join(
        [f"{scope}-caller:{sha256_hex(key)}:{scope}" for scope, key in keys.items()]
        + [f"sidecar:{sha256_hex(sidecar_key)}:admin"]
    )
    logs = tmp_path_factory.mktemp("e2e-keys-logs")
    procs = Processes(logs)
    recorder = serve(Recorder())
    tap = None
    try:
        sc_port, gateway_port = free_port(), free_port()
        start_sidecar(procs, "sidecar-keys", sc_port, gateway_port, GATEWAY_API_KEY=sidecar_key)
        tap = serve(SidecarTap(sc_port))
        gateway = Gateway(
            procs, "envoy-keys", recorder.url, tap.port, port=gateway_port,
            AUTH_MODE="keys", GATEWAY_KEYS=gateway_keys, TURBOPUFFER_API_KEY=upstream_key,
        )
        yield SimpleNamespace(
            gateway=gateway,
            recorder=recorder,
            tap=tap,
            keys=keys,
            sidecar_key=sidecar_key,
            upstream_key=upstream_key,
            logs=logs,
        )
    finally:
        procs.stop_all()
        stop_server(recorder)
        if tap:
            stop_server(tap)
