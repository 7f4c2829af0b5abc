"""Read-your-writes across replicas, with the mirror after the response: two Envoys, each with its
own sidecar, both sidecars on one cache (the Aerospike wire double). A write acknowledged by one
gateway is never followed, through the other, by a fetch of the version cached before it.

Each writer owns some ids. For each write it first fetches the document through the other gateway
(so the shared cache holds the current version), writes the next version through one gateway,
and as soon as it holds the 2xx fetches through the other one: that fetch must return the new
version (from the cache, once the mirror landed, or from the stand-in Turbopuffer). The mirror
goes to the sidecar after the response, so without the eviction that the write carries, the
second fetch would race the mirror and read the old copy.

It runs twice: with the evictions grouped adaptively (the default: a write's eviction joins its
worker's group while another is out) and always grouped, where every write's 2xx waits for a
group the worker's root context sends, and the root resumes the responses that wait for it."""

import json
import random
import threading
import time

import httpx
import pytest

from conftest import AUTH, SIDECAR, Gateway, Processes, free_port, port_open, serve, stop_server, wait_until
from test_fence import DOUBLE, Truth

NS = "ryw"
WRITERS = 4
WRITES_PER_WRITER = 150
IDS_PER_WRITER = 10


@pytest.fixture(params=["adaptive", "always"])
def two_replicas(tmp_path, request):
    if not DOUBLE.exists():
        pytest.exit(f"{DOUBLE} is missing: run `make test-e2e` (it builds it)", 2)
    procs = Processes(tmp_path)
    truth = serve(Truth())
    try:
        double_port = free_port()
        procs.start("double", [str(DOUBLE), f"127.0.0.1:{double_port}", "hevlayer"])
        wait_until(lambda: port_open(double_port), "aerospike double")
        gateways = []
        for name in ("a", "b"):
            sidecar_port, gateway_port = free_port(), free_port()
            procs.start(
                f"sidecar-{name}",
                [str(SIDECAR), "--listen", f"127.0.0.1:{sidecar_port}", "--gateway-url",
                 f"http://127.0.0.1:{gateway_port}", "--log-json", "false"],
                env={"AEROSPIKE_HOSTS": f"127.0.0.1:{double_port}"},
            )
            wait_until(lambda p=sidecar_port: httpx.get(f"http://127.0.0.1:{p}/healthz").status_code == 200,
                       f"sidecar {name}")
            gateways.append(Gateway(procs, f"envoy-{name}", truth.url, sidecar_port, port=gateway_port,
                                    ROUTE_TIMEOUT="5s", GROUP_EVICTIONS=request.param))
        yield gateways, truth, request.param
    finally:
        procs.stop_all()
        stop_server(truth)


def fetch_version(client, url, doc):
    r = client.get(f"{url}/v2/namespaces/{NS}/documents/{doc}")
    if r.status_code == 404:
        return None, r.headers.get("x-layer-cache")
    assert r.status_code == 200, r.text
    return r.json()["attributes"]["v"], r.headers.get("x-layer-cache")


def test_a_write_acknowledged_by_one_replica_is_read_through_the_other(two_replicas):
    (a, b), truth, group = two_replicas
    stale, errors = [], []
    labels = {"before": {}, "after": {}}
    lock = threading.Lock()

    def writer(index):
        rng = random.Random(index)
        owned = [index * IDS_PER_WRITER + i for i in range(IDS_PER_WRITER)]
        version = dict.fromkeys(owned, 0)
        with httpx.Client(headers=AUTH, timeout=10) as client:
            for n in range(WRITES_PER_WRITER):
                doc = rng.choice(owned)
                write_via, read_via = (a, b) if n % 2 == 0 else (b, a)
                before, label = fetch_version(client, read_via.url, doc)
                with lock:
                    labels["before"][label] = labels["before"].get(label, 0) + 1
                version[doc] += 1
                v = version[doc]
                body = json.dumps({"upsert_rows": [{"id": doc, "v": v}]})
                r = client.post(f"{write_via.url}/v2/namespaces/{NS}", content=body)
                if r.status_code != 200:
                    with lock:
                        errors.append((doc, v, r.status_code, r.text))
                    continue
                after, label = fetch_version(client, read_via.url, doc)
                with lock:
                    labels["after"][label] = labels["after"].get(label, 0) + 1
                    if after is None or after < v:
                        stale.append((doc, v, after, label, before))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - started
    # The mirrors after the responses are answered within their timeout.
    time.sleep(0.5)
    counters = [g.counters() for g in (a, b)]
    total = WRITERS * WRITES_PER_WRITER
    print(f"\n{total} writes in {elapsed:.1f}s; fetches before a write {labels['before']}, "
          f"right after its 2xx {labels['after']}; stale {len(stale)}")
    for name, c in zip("ab", counters):
        print(f"gateway {name}:", {k.removeprefix("hevlayer."): v for k, v in c.items() if v and any(
            s in k for s in ("mirror", "evict", "writes_accepted"))})
    assert not errors, errors[:5]
    assert not stale, f"{len(stale)} fetches older than the write just acknowledged, e.g. {stale[:5]}"
    # The run did what it is for: the shared cache served the other replica's fetches, every
    # write was evicted ahead and mirrored after its response.
    assert labels["before"].get("hit", 0) > total // 4, labels
    for c in counters:
        assert c["hevlayer.evict_ahead_ok"] == c["hevlayer.writes_accepted"] == total // 2, c
        assert c["hevlayer.mirror_ok"] == total // 2, c
        if group == "always":
            assert c["hevlayer.evict_ahead_grouped"] == total // 2, c
            assert 0 < c["hevlayer.eviction_groups"] <= total // 2, c
