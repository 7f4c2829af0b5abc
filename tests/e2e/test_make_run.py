"""`make run`'s script, envoy/run.sh, as a user runs it: it starts the whole gateway, the example it
prints works, and Ctrl-C stops everything it started. On free loopback ports, bounded waits."""

import os
import signal
import socket
import subprocess
import time

import httpx

from conftest import ROOT, free_port, port_open, wait_until

RUN = ROOT / "envoy" / "run.sh"


# What would point run.sh at something other than the local defaults.
UNSET = ("TURBOPUFFER_URL", "TURBOPUFFER_API_KEY", "TURBOPUFFER_REGION", "AUTH_MODE", "AEROSPIKE_HOSTS")


def start_run(env):
    base = {k: v for k, v in os.environ.items() if k not in UNSET}
    return subprocess.Popen(
        [str(RUN)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**base, **env},
        text=True,
        start_new_session=True,  # the test signals it like a terminal's Ctrl-C would
    )


def read_until(proc, marker, seconds=60.0):
    """Output of `proc` up to the line holding `marker`; fails if it exits or takes too long."""
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
            raise AssertionError(f"run.sh exited {proc.returncode} before '{marker}':\n{''.join(seen)}")
        time.sleep(0.05)
    raise AssertionError(f"no '{marker}' from run.sh within {seconds}s:\n{''.join(seen)}")


def ports_env():
    ports = {name: free_port() for name in ("GATEWAY_PORT", "ADMIN_PORT", "SIDECAR_PORT", "MINIFUGU_PORT")}
    return ports, {name: str(port) for name, port in ports.items()}


def test_run_starts_everything_answers_and_ctrl_c_stops_it_all():
    ports, env = ports_env()
    proc = start_run(env)
    try:
        banner = read_until(proc, "Ctrl-C stops everything.")
        gateway = f"http://127.0.0.1:{ports['GATEWAY_PORT']}"
        assert gateway in banner and "minifugu" in banner and "embedded document cache" in banner
        # The example the banner prints: a write, then the document from the cache.
        auth = {"authorization": "Bearer local-key"}
        write = httpx.post(f"{gateway}/v2/namespaces/run-demo", headers=auth,
                           json={"upsert_rows": [{"id": 1, "title": "hello"}]}, timeout=10)
        assert write.status_code == 200, write.text
        fetched = httpx.get(f"{gateway}/v2/namespaces/run-demo/documents/1", headers=auth, timeout=10)
        assert fetched.status_code == 200 and fetched.headers["x-layer-cache"] == "hit"
        assert fetched.json()["attributes"]["title"] == "hello"
        assert isinstance(fetched.json()["attributes"]["_hevlayer_upserted_at"], int)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 130
        for name, port in ports.items():
            wait_until(lambda: not port_open(port), f"{name} {port} released", seconds=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_run_refuses_a_port_in_use_and_starts_nothing():
    ports, env = ports_env()
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports["SIDECAR_PORT"]))
        held.listen()
        proc = start_run(env)
        try:
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    assert proc.returncode == 1
    assert f"port {ports['SIDECAR_PORT']} is already in use; set SIDECAR_PORT" in out
    assert not port_open(ports["GATEWAY_PORT"]) and not port_open(ports["MINIFUGU_PORT"])
