#!/usr/bin/env python3
"""Runs Envoy on what each rendered values set would give the gateway pod's Envoy.

    envoy_check.py --envoy ENVOY --wasm FILTER.wasm DIR     (DIR: what render_all.py wrote)

plain: the configuration the render-config init container writes (rendered here from the
ConfigMap's own render.py and template, with the pod's environment), with the filter path
rewritten to the real built .wasm, must pass `envoy --mode validate`.

istio: the EnvoyFilter's patches are put into a minimal bootstrap in the place Istio puts them
(the layer_sidecar cluster, the buffer limits, the filter loaded by ECDS from the file that
render-config writes), which must pass `envoy --mode validate`; and since validation does not
read ECDS files, Envoy is also started on it (loopback, port 0): the filter must be configured
from that file and refuse an empty write with its own 422.
"""

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

import monitoring
from manifests import SIDECAR_KEY, value_sets

ECDS_STATS = "extension_config_discovery.http_filter.hevlayer."


def use_built_wasm(path, pod_wasm, wasm):
    with open(path) as f:
        text = f.read()
    if text.count(pod_wasm) != 1:
        sys.exit(f"{path}: expected the pod's filter path {pod_wasm} once")
    with open(path, "w") as f:
        f.write(text.replace(pod_wasm, wasm))


def validate(envoy, config):
    result = subprocess.run([envoy, "--mode", "validate", "-c", config, "--log-level", "warn"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"envoy --mode validate {config}:\n{result.stdout}{result.stderr}")


def patch(patches, apply_to, operation):
    return [copy.deepcopy(x["patch"]["value"]) for x in patches if x["applyTo"] == apply_to and x["patch"]["operation"] == operation]


def istio_bootstrap(vs, ecds_file):
    """Istio's gateway listener and Turbopuffer cluster, reduced to what the patches touch."""
    patches = vs.one("EnvoyFilter")["spec"]["configPatches"]
    (sidecar_cluster,) = patch(patches, "CLUSTER", "ADD")
    (filter_,) = patch(patches, "HTTP_FILTER", "INSERT_BEFORE")
    filter_["config_discovery"]["config_source"]["path_config_source"]["path"] = ecds_file
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "route_config": {"virtual_hosts": [{"name": "turbopuffer", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "turbopuffer"}}]}]},
        "http_filters": [filter_, router],
    }
    listener = {"name": "gateway", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}
    # A stand-in for Istio's outbound cluster to Turbopuffer, on loopback: nothing leaves the machine.
    turbopuffer = {"name": "turbopuffer", "type": "STATIC", "load_assignment": {"cluster_name": "turbopuffer", "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}}
    for value in patch(patches, "LISTENER", "MERGE"):
        listener.update(value)
    for value in patch(patches, "CLUSTER", "MERGE"):
        turbopuffer.update(value)
    return {
        "node": {"id": "hevlayer-check", "cluster": "hevlayer"},
        "static_resources": {"listeners": [listener], "clusters": [sidecar_cluster, turbopuffer]},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    }


def stats(admin, prefix):
    with urllib.request.urlopen(f"http://{admin}/stats?filter=^{prefix}", timeout=2) as r:
        return dict(line.split(": ", 1) for line in r.read().decode().splitlines() if ": " in line)


def listener_port(admin):
    with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=2) as r:
        return json.load(r)["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]


def empty_write(port):
    """POST {} as a client would: only a filter that saw the body answers 422 (without
    allow_on_headers_stop_iteration the request would hang), and nothing needs an upstream."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/namespaces/check", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {SIDECAR_KEY}", "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error).get("error")
    except OSError as error:  # no answer in time: the filter never saw the body
        return None, str(error)
    return 200, None


def prometheus_names(admin):
    """The filter's metric names as Envoy's /stats/prometheus shows them (what the dashboard and
    the alerts query)."""
    with urllib.request.urlopen(f"http://{admin}/stats/prometheus", timeout=2) as r:
        text = r.read().decode()
    return set(re.findall(r"^# TYPE ((?:envoy_)?(?:wasmcustom_)?hevlayer_\w+) ", text, re.M))


def check_prometheus_names(names):
    """Envoy names the filter's stats exactly as monitoring.py derives them from the code."""
    if names != monitoring.FILTER:
        sys.exit(f"Envoy's /stats/prometheus shows {sorted(names - monitoring.FILTER)} and lacks "
                 f"{sorted(monitoring.FILTER - names)}: monitoring.py's names for filter/src/metrics.rs are off")


def run_with_filter(envoy, config, workdir):
    """Starts Envoy, waits until ECDS delivered the filter and its VM accepted the plugin
    configuration, then sends one write the filter must refuse."""
    admin_file = os.path.join(workdir, "admin-address")
    proc = subprocess.Popen([envoy, "-c", config, "--disable-hot-restart", "--concurrency", "1", "--log-level", "warn",
                             "--admin-address-path", admin_file], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    problem = "Envoy did not configure the filter in 20 s"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(admin_file) and os.path.getsize(admin_file):
                with open(admin_file) as f:
                    admin = f.read().strip()
                ecds = stats(admin, ECDS_STATS)
                # A plugin configuration the filter refuses shows as a rejected update.
                if any(ecds.get(ECDS_STATS + s, "0") != "0" for s in ("update_failure", "update_rejected", "config_fail")):
                    problem = "Envoy rejected the filter's ECDS resource"
                    break
                if ecds.get(ECDS_STATS + "update_success", "0") != "0":
                    answer = empty_write(listener_port(admin))
                    if answer == (422, "validation_error"):
                        return prometheus_names(admin)
                    problem = f"an empty write got {answer}, not 422 validation_error from the filter"
                    break
            time.sleep(0.1)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
    sys.exit(f"{config}: {problem}\n{output}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--envoy", required=True)
    parser.add_argument("--wasm", required=True)
    parser.add_argument("directory")
    args = parser.parse_args()
    if not os.path.exists(args.wasm):
        sys.exit(f"{args.wasm} is missing: build it with `make wasm`")
    wasm = os.path.abspath(args.wasm)
    for vs in value_sets(args.directory):
        pod_wasm = vs.env(vs.container("render-config"))["FILTER_WASM"]
        with tempfile.TemporaryDirectory() as workdir:
            _, rendered = vs.render(workdir)
            use_built_wasm(rendered, pod_wasm, wasm)
            if not vs.istio:
                validate(args.envoy, rendered)
                print(f"envoy --mode validate {vs.name}: the configuration the ConfigMap renders, with {args.wasm}")
                continue
            bootstrap = os.path.join(workdir, "bootstrap.yaml")
            with open(bootstrap, "w") as f:
                yaml.safe_dump(istio_bootstrap(vs, rendered), f, sort_keys=False)
            validate(args.envoy, bootstrap)
            names = run_with_filter(args.envoy, bootstrap, workdir)
            check_prometheus_names(names)
            print(f"envoy {vs.name}: the EnvoyFilter patches validate; Envoy loads the filter ({args.wasm}) "
                  f"from the rendered ECDS file and it answers an empty write with 422; /stats/prometheus names its "
                  f"{len(names)} stats as monitoring.py expects ({min(names)}, ...)")


if __name__ == "__main__":
    main()
