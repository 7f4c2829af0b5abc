"""Nothing stale: the fence under faults, through the real Envoy, with the sidecar on the Aerospike
wire double (so the cache outlives a sidecar restart, as Aerospike does).

5,000 writes over 200 ids from 4 clients, fetches of those ids from 2 more, against a stand-in
Turbopuffer that answers after a short delay; meanwhile the sidecar is killed and restarted every
~2 s and once stalled past the mirror timeout, a share of the writers hang up right after sending
their body, and a share of the writes are refused by the upstream (5xx, 429). Each id's writes come
from one client, one at a time, with rising versions, so "newer" is well defined: a fetch that
starts after a version was acknowledged to its writer (or, for a hang-up, applied upstream) must
not return an older one. Refused writes must never be seen at all."""

import http.client
import http.server
import json
import random
import signal
import threading
import time

import httpx
import pytest

from conftest import (AUTH, ROOT, SIDECAR, Gateway, Processes, QuietServer, free_port, port_open, read_body,
                      serve, stop_server, wait_until)

DOUBLE = ROOT / "target" / "release" / "aerospike-double"
NS = "fenced"
IDS = 200
WRITERS = 4
WRITES = 5_000
FETCHERS = 2
# A pause between one client's fetches: they share two cores with everything else here.
FETCH_PAUSE = 0.003
UPSTREAM_DELAY = 0.01
HANG_UP_SHARE = 0.10
REFUSED_SHARE = 0.05


class Truth(QuietServer):
    """The stand-in Turbopuffer: applies `upsert_rows` after a short delay (or refuses them, when a
    row asks), answers id queries with what it holds, and logs when each version was applied."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows = {}  # id -> attributes as written (with the gateway's stamp)
        self.applied = {}  # (id, v) -> monotonic time applied
        self.refused = set()  # (id, v)
        self.received = set()  # (id, v), whatever became of it
        super().__init__(("127.0.0.1", 0), TruthHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class TruthHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle's algorithm holds the body for
    # the peer's delayed ACK (tens of milliseconds a request).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        read_body(self)
        return self._send(200, {"approx_row_count": 0, "index": {"status": "up-to-date"}})

    def do_POST(self):
        body = json.loads(read_body(self) or b"{}")
        server = self.server
        if self.path.split("?")[0].endswith("/query"):
            wanted = body.get("filters", [None, None, None])[2]
            with server.lock:
                row = server.rows.get(wanted)
            rows = [{"id": wanted, **row}] if row else []
            return self._send(200, {"rows": rows, "billing": {}})
        rows = body.get("upsert_rows", [])
        keys = [(r["id"], r["v"]) for r in rows]
        with server.lock:
            server.received.update(keys)
        fail = next((r.get("fail") for r in rows if r.get("fail")), None)
        time.sleep(UPSTREAM_DELAY)
        if fail:
            with server.lock:
                server.refused.update(keys)
            return self._send(fail, {"status": "error", "error": "refused by the test"})
        with server.lock:
            now = time.monotonic()
            for r in rows:
                server.rows[r["id"]] = {k: v for k, v in r.items() if k != "id"}
                server.applied[(r["id"], r["v"])] = now
        return self._send(200, {"status": "OK", "message": "ok", "rows_affected": len(rows), "billing": {}})


class Sidecar:
    """The sidecar process, on the Aerospike double, restartable on its port."""

    def __init__(self, procs, port, gateway_port, double_port):
        self.procs, self.port = procs, port
        self.argv = [str(SIDECAR), "--listen", f"127.0.0.1:{port}", "--gateway-url",
                     f"http://127.0.0.1:{gateway_port}", "--log-json", "false"]
        self.env = {"AEROSPIKE_HOSTS": f"127.0.0.1:{double_port}", "CACHE_OP_TIMEOUT_MS": "500"}
        self.start()

    def start(self):
        self.proc = self.procs.start("sidecar-fence", self.argv, env=self.env)

    def healthy(self):
        return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200

    def restart(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.start()
        wait_until(self.healthy, "restarted sidecar", seconds=15)

    def stall(self, seconds):
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture()
def fence_stack(tmp_path):
    if not DOUBLE.exists():
        pytest.exit(f"{DOUBLE} is missing: run `make test-e2e` (it builds it)", 2)
    procs = Processes(tmp_path)
    truth = serve(Truth())
    try:
        double_port, sidecar_port, gateway_port = free_port(), free_port(), free_port()
        procs.start("double", [str(DOUBLE), f"127.0.0.1:{double_port}", "hevlayer"])
        wait_until(lambda: port_open(double_port), "aerospike double")
        sidecar = Sidecar(procs, sidecar_port, gateway_port, double_port)
        gateway = Gateway(procs, "envoy-fence", truth.url, sidecar_port, port=gateway_port, ROUTE_TIMEOUT="5s")
        wait_until(sidecar.healthy, "sidecar")
        yield gateway, sidecar, truth
    finally:
        procs.stop_all()
        stop_server(truth)


def hang_up_write(port, body):
    """Sends a write and closes the connection right after its body, before any answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.putrequest("POST", f"/v2/namespaces/{NS}")
    conn.putheader("authorization", AUTH["authorization"])
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(len(body)))
    conn.endheaders(body)
    conn.sock.close()


def test_no_fetch_returns_a_version_older_than_one_acknowledged(fence_stack):
    gateway, sidecar, truth = fence_stack
    rng = random.Random(7)
    acked = {}  # id -> [(monotonic time, v)]
    outcomes = {"ok": 0, "refused": 0, "hung_up": 0, "errors": 0}
    fetched = []  # (start, id, v or None, x-layer-cache)
    lock = threading.Lock()
    stop_fetching = threading.Event()
    writes_done = threading.Event()

    def writer(index):
        owned = [i for i in range(IDS) if i % WRITERS == index]
        version = {i: 0 for i in owned}
        wrng = random.Random(index)
        with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=10) as client:
            for _ in range(WRITES // WRITERS):
                doc = wrng.choice(owned)
                version[doc] += 1
                v = version[doc]
                row = {"id": doc, "v": v}
                roll = wrng.random()
                if roll < REFUSED_SHARE:
                    row["fail"] = wrng.choice([500, 429])
                body = json.dumps({"upsert_rows": [row]}).encode()
                if REFUSED_SHARE <= roll < REFUSED_SHARE + HANG_UP_SHARE:
                    hang_up_write(gateway.port, body)
                    # The write's fate is the upstream's: wait until it saw it, so the next write
                    # of this id cannot overtake it.
                    deadline = time.monotonic() + 5
                    while (doc, v) not in truth.received and time.monotonic() < deadline:
                        time.sleep(0.002)
                    with lock:
                        outcomes["hung_up"] += 1
                    continue
                r = client.post(f"/v2/namespaces/{NS}", content=body)
                with lock:
                    if r.status_code == 200:
                        acked.setdefault(doc, []).append((time.monotonic(), v))
                        outcomes["ok"] += 1
                    elif r.status_code in (429, 500) and "fail" in row:
                        outcomes["refused"] += 1
                    else:
                        outcomes["errors"] += 1

    def fetcher(index):
        frng = random.Random(100 + index)
        with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=10) as client:
            while not stop_fetching.is_set():
                doc = frng.randrange(IDS)
                start = time.monotonic()
                r = client.get(f"/v2/namespaces/{NS}/documents/{doc}")
                if r.status_code == 200:
                    v = r.json()["attributes"].get("v")
                    with lock:
                        fetched.append((start, doc, v, r.headers.get("x-layer-cache")))
                time.sleep(FETCH_PAUSE)

    def faults():
        n = 0
        while not writes_done.is_set():
            time.sleep(2)
            if writes_done.is_set():
                break
            n += 1
            if n == 3:
                sidecar.stall(0.7)  # past the filter's 200 ms mirror timeout
            else:
                sidecar.restart()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    threads += [threading.Thread(target=fetcher, args=(i,)) for i in range(FETCHERS)]
    chaos = threading.Thread(target=faults)
    started = time.monotonic()
    for t in threads:
        t.start()
    chaos.start()
    for t in threads[:WRITERS]:
        t.join(600)
    writes_done.set()
    chaos.join(60)
    # Once the faults stop, every fence is released by the sidecar's acknowledgements.
    wait_until(sidecar.healthy, "sidecar after the faults")
    wait_until(lambda: gateway.counters().get("hevlayer.evictions_pending", 1) == 0, "fences released", 30)
    time.sleep(0.5)
    stop_fetching.set()
    for t in threads[WRITERS:]:
        t.join(60)
    elapsed = time.monotonic() - started

    # Applied hang-ups count from the moment the upstream applied them.
    committed = {doc: list(entries) for doc, entries in acked.items()}
    for (doc, v), at in truth.applied.items():
        committed.setdefault(doc, []).append((at, v))
    for entries in committed.values():
        entries.sort()
    stale, phantom = [], []
    for start, doc, v, label in fetched:
        needed = max((ver for at, ver in committed.get(doc, []) if at < start), default=0)
        if v is not None and v < needed:
            stale.append((doc, v, needed, label))
        if v is not None and (doc, v) in truth.refused:
            phantom.append((doc, v, label))
    counters = gateway.counters()
    hits = sum(1 for f in fetched if f[3] == "hit")
    print(f"\n{WRITES} writes in {elapsed:.1f}s: {outcomes}; {len(fetched)} fetches ({hits} hits, "
          f"{sum(1 for f in fetched if f[3] == 'bypass')} bypassed); stale {len(stale)}, phantom {len(phantom)}")
    print("filter counters:", {k.removeprefix("hevlayer."): v for k, v in counters.items() if v and any(
        s in k for s in ("mirror", "evictions", "fetches", "unanswered", "fence", "writes_accepted"))})
    assert not stale, f"{len(stale)} fetches older than an acknowledged version, e.g. {stale[:5]}"
    assert not phantom, f"{len(phantom)} fetches of versions Turbopuffer refused, e.g. {phantom[:5]}"
    assert outcomes["errors"] == 0, outcomes
    assert outcomes["ok"] + outcomes["refused"] + outcomes["hung_up"] == WRITES
    # The faults did what they were for: mirrors failed, fences held and were released.
    assert counters["hevlayer.mirror_failed"] + counters["hevlayer.mirror_timeout"] > 0, counters
    assert counters["hevlayer.writes_unanswered"] > 0 and counters["hevlayer.evictions_acknowledged"] > 0
    assert hits > 100, "the cache served fetches between the faults"
    # Every accepted write ended in exactly one mirror outcome.
    ends = sum(counters[f"hevlayer.{c}"] for c in
               ("mirror_ok", "mirror_failed", "mirror_timeout", "mirror_skipped", "writes_unanswered"))
    assert ends == counters["hevlayer.writes_accepted"] == WRITES, counters
