"""The demo as `make demo` runs it: demo/run.sh (envoy/run.sh's gateway and the store app) on free
loopback ports, stopped with Ctrl-C (SIGINT to its process group) at the end. The port helpers
come from the end-to-end tests' conftest (tests/e2e/conftest.py)."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo"
sys.path.insert(0, str(DEMO))  # the store's modules (embedder, pipeline) for the tests

_spec = importlib.util.spec_from_file_location("e2e_conftest", ROOT / "tests" / "e2e" / "conftest.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)
free_port, port_open, read_until = e2e.free_port, e2e.port_open, e2e.read_until

PORTS = ("DEMO_PORT", "GATEWAY_PORT", "ADMIN_PORT", "SIDECAR_PORT", "MINIFUGU_PORT")


def stop_with_ctrl_c(proc, seconds=20.0):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise AssertionError("demo/run.sh did not stop within 20 s of Ctrl-C")


@pytest.fixture(scope="session")
def demo():
    """The running demo: its ports, the store's URL, the banner, and the process (stopped at the end)."""
    ports = {name: free_port() for name in PORTS}
    env = {k: v for k, v in os.environ.items()
           if k not in ("TURBOPUFFER_URL", "TURBOPUFFER_API_KEY", "TURBOPUFFER_REGION", "AUTH_MODE", "AEROSPIKE_HOSTS")}
    env.update({name: str(port) for name, port in ports.items()})
    # Quicker than the interactive pace, still several batches.
    env.update({"DEMO_STAGE_PAUSE": "0", "DEMO_EMBED_PAUSE": "0.05", "DEMO_BATCH_SIZE": "25"})
    proc = subprocess.Popen([str(DEMO / "run.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, start_new_session=True, preexec_fn=e2e.default_interrupts)
    try:
        banner = read_until(proc, "Ctrl-C stops everything.", 90)
        url = f"http://127.0.0.1:{ports['DEMO_PORT']}/"
        yield {"proc": proc, "ports": ports, "url": url, "banner": banner,
               "http": httpx.Client(base_url=url, timeout=30)}
    finally:
        stop_with_ctrl_c(proc)


def wait_for(check, what, seconds):
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {seconds}s (last: {last!r})")


@pytest.fixture(scope="session")
def indexed(demo):
    """The pipeline state once every product is indexed and the namespace's read watermark is
    known. The watermark trails the namespace's first write: the filter registers the namespace
    at its next refresh, the sidecar polls the metadata until a poll sees the index up to date,
    and the filter's next refresh brings the watermark in (in a local run it was known 1.5 s
    before the last document was indexed). A run where the pipeline outpaces that finishes
    first (a clean-clone CI run did)."""
    http = demo["http"]

    def done():
        state = http.get("/api/pipeline").json()
        counts = state.get("counts") or {}
        finished = counts.get("indexed") == state["products"] and not state["progress"]["running"]
        return state if finished and state["stable_as_of"] is not None else None

    return wait_for(done, "the whole catalogue indexed and its watermark known", 60)
