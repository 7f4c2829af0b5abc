"""`make run`'s script, envoy/run.sh, as a user runs it: it starts the whole gateway, the example it
prints works, and Ctrl-C stops everything it started. On free loopback ports, bounded waits."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, default_interrupts, free_port, port_open, read_until, wait_until

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
        preexec_fn=default_interrupts,
    )


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
        # The logs line names a folder that holds the logs of what was started.
        logs_line = next(line for line in banner.splitlines() if line.strip().startswith("logs"))
        logs_dir = logs_line.split()[1].split("{")[0]
        for name in ("envoy.log", "sidecar.log", "minifugu.log"):
            assert os.path.exists(os.path.join(logs_dir, name)), (logs_dir, name)
        # The example the banner prints, run as printed: a write, then the document from the cache.
        example = banner.split("Try:\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
        commands = [line.strip() for line in example.splitlines() if line.strip()]
        assert len(commands) == 2 and all(c.startswith("curl ") for c in commands), commands
        write = subprocess.run(["bash", "-c", commands[0]], capture_output=True, text=True, timeout=20)
        assert write.returncode == 0 and json.loads(write.stdout)["rows_affected"] == 1, write
        fetched = subprocess.run(["bash", "-c", commands[1] + " -i"], capture_output=True, text=True, timeout=20)
        head, _, body = fetched.stdout.replace("\r\n", "\n").partition("\n\n")
        assert head.startswith("HTTP/1.1 200") and "x-layer-cache: hit" in head.lower(), fetched.stdout
        document = json.loads(body)
        assert document["attributes"]["title"] == "hello"
        assert isinstance(document["attributes"]["_hevlayer_upserted_at"], int)
        assert gateway in commands[0]
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


def test_two_gateways_run_side_by_side_on_one_host():
    runs = []
    try:
        for _ in range(2):
            ports, env = ports_env()
            runs.append((ports, start_run(env)))
        for ports, proc in runs:
            read_until(proc, "Ctrl-C stops everything.")
        for i, (ports, _) in enumerate(runs):
            gateway = f"http://127.0.0.1:{ports['GATEWAY_PORT']}"
            auth = {"authorization": "Bearer local-key"}
            r = subprocess.run(
                ["curl", "-s", "-X", "POST", f"{gateway}/v2/namespaces/side-{i}", "-H", "authorization: Bearer local-key",
                 "-H", "content-type: application/json", "-d", '{"upsert_rows":[{"id":1,"n":%d}]}' % i],
                capture_output=True, text=True, timeout=20)
            assert json.loads(r.stdout)["rows_affected"] == 1, r
            fetched = subprocess.run(
                ["curl", "-s", f"{gateway}/v2/namespaces/side-{i}/documents/1", "-H", f"authorization: {auth['authorization']}"],
                capture_output=True, text=True, timeout=20)
            assert json.loads(fetched.stdout)["attributes"]["n"] == i, fetched
        # Each keeps its own config and logs.
        dirs = {ROOT / ".run" / f"gateway-{ports['GATEWAY_PORT']}" for ports, _ in runs}
        assert len(dirs) == 2 and all((d / "logs" / "envoy.log").exists() for d in dirs)
        for _, proc in runs:
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(20) == 130
    finally:
        for _, proc in runs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.mark.parametrize(
    "var, default, good, bads, message",
    [
        ("MIRROR_LINGER_MS", '"mirror_linger_ms":2', ("5", '"mirror_linger_ms":5'),
         ("1001", "-1", "soon"), "MIRROR_LINGER_MS must be an integer from 0 to 1000"),
        ("MIRROR_LINGER_MAX_MS", '"mirror_linger_max_ms":20', ("0", '"mirror_linger_max_ms":0'),
         ("1001", "-1", "long"), "MIRROR_LINGER_MAX_MS must be an integer from 0 to 1000"),
        ("MIRROR_RIDE_BYTES", '"mirror_ride_bytes":65536', ("0", '"mirror_ride_bytes":0'),
         ("1048577", "-1", "lots"), "MIRROR_RIDE_BYTES must be an integer from 0 to 1048576"),
        ("COUNTER_BATCH", '"counter_batch":64', ("1", '"counter_batch":1'),
         ("0", "10001", "-1", "many"), "COUNTER_BATCH must be an integer from 1 to 10000"),
        ("GROUP_EVICTIONS", '"group_evictions":"adaptive"', ("off", '"group_evictions":"off"'),
         ("never", "ALWAYS", "1"), "GROUP_EVICTIONS must be adaptive, always or off"),
    ],
)
def test_render_validates_and_passes_a_filter_setting(tmp_path, var, default, good, bads, message):
    render = [sys.executable, str(ROOT / "envoy" / "render.py"), "--profile", "local", "--out", str(tmp_path / "e.yaml")]
    env = {k: v for k, v in os.environ.items() if k != var}
    ok = subprocess.run(render, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert default in (tmp_path / "e.yaml").read_text()
    ok = subprocess.run(render, env={**env, var: good[0]}, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert good[1] in (tmp_path / "e.yaml").read_text()
    for bad in bads:
        refused = subprocess.run(render, env={**env, var: bad}, capture_output=True, text=True)
        assert refused.returncode != 0, bad
        assert message in refused.stderr, refused.stderr
