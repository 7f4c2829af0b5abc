#!/usr/bin/env python3
"""Fails when the manifests drift from what the filter, the sidecar and the Envoy templates use.

    drift.py DIR        (DIR: what render_all.py wrote)

The truth is read from the code, never from a list kept here: the sidecar's environment
variables and default port from sidecar/src/config.rs, the plugin configuration's fields and the
sidecar cluster's name from filter/src/config.rs, the variables envoy/render.py reads, and the
configuration render.py produces from each manifest's own environment.
"""

import json
import os
import re
import sys
import tempfile
from urllib.parse import urlparse

import yaml

from manifests import ROOT, SECRET_VALUES, value_sets


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


SIDECAR_RS = read("sidecar/src/config.rs")
FILTER_RS = read("filter/src/config.rs")
RENDER_PY = read("envoy/render.py")

SIDECAR_ENV = set(re.findall(r'env = "([A-Z0-9_]+)"', SIDECAR_RS))
SIDECAR_PORT = int(re.search(r'env = "SIDECAR_LISTEN", default_value = "[^"]*:(\d+)"', SIDECAR_RS).group(1))
GATEWAY_PORT = int(re.search(r'env = "GATEWAY_URL", default_value = "http://[^"]*:(\d+)"', SIDECAR_RS).group(1))
FILTER_FIELDS = set(re.findall(r"^\s+(\w+):", re.search(r"struct RawConfig \{(.*?)\n\}", FILTER_RS, re.S).group(1), re.M))
SIDECAR_CLUSTER = re.search(r'DEFAULT_SIDECAR_CLUSTER: &str = "([^"]+)"', FILTER_RS).group(1)
RENDER_ENV = set(re.findall(r'\b(?:env|port|positive|bounded)\("([A-Z0-9_]+)"', RENDER_PY))
SECRET_ENV = set(SECRET_VALUES)


class Problems(list):
    def check(self, ok, message):
        if not ok:
            self.append(message)


def port_of(host_port):
    return int(host_port.rsplit(":", 1)[1])


def clusters_by_name(config):
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def endpoint(cluster):
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def wasm_config(config):
    """The hevlayer wasm filter's PluginConfig in a full configuration or an ECDS resource file."""
    if "resources" in config:
        return config["resources"][0]["typed_config"]["config"]
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]


def check_chart_defaults(p):
    with open(os.path.join(ROOT, "envoy/kubernetes/chart/values.yaml")) as f:
        values = yaml.safe_load(f)
    p.check(values["sidecar"]["port"] == SIDECAR_PORT, f"chart default sidecar.port is not the sidecar's {SIDECAR_PORT}")
    p.check(values["gateway"]["port"] == GATEWAY_PORT, f"chart default gateway.port is not the sidecar's GATEWAY_URL port {GATEWAY_PORT}")


def check_pod(vs, p, workdir):
    """Ports, names and paths inside the gateway pod, and the configuration it renders."""
    sidecar, init, proxy = vs.container("sidecar"), vs.container("render-config"), vs.proxy
    side_env, init_env = vs.env(sidecar), vs.env(init)

    unknown = set(side_env) - SIDECAR_ENV
    p.check(not unknown, f"sidecar env {sorted(unknown)} not read by sidecar/src/config.rs")
    unknown = set(init_env) - RENDER_ENV
    p.check(not unknown, f"render-config env {sorted(unknown)} not read by envoy/render.py")
    for c in (sidecar, init):
        for var in c.get("env", []):
            p.check(var["name"] not in SECRET_ENV or "valueFrom" in var, f"{var['name']} is inlined, not a secretKeyRef")
    p.check(not vs.objects("Secret"), "the chart must not create Secrets")

    sidecar_port = port_of(side_env["SIDECAR_LISTEN"])
    p.check(vs.port(sidecar, "sidecar") == sidecar_port, "sidecar containerPort != SIDECAR_LISTEN port")
    p.check(int(init_env["SIDECAR_PORT"]) == sidecar_port, "render SIDECAR_PORT != SIDECAR_LISTEN port")
    p.check(vs.pod["metadata"]["annotations"]["prometheus.io/port"] == str(sidecar_port), "prometheus.io/port != sidecar port")
    p.check(sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "sidecar"}, "startup probe is not /healthz on the sidecar port")

    gateway = urlparse(side_env["GATEWAY_URL"])
    p.check(gateway.hostname == "127.0.0.1", "GATEWAY_URL must be the pod's own listener")
    p.check(int(init_env["GATEWAY_PORT"]) == gateway.port, "render GATEWAY_PORT != GATEWAY_URL port")
    p.check(vs.port(proxy, "gateway") == gateway.port, "proxy gateway containerPort != GATEWAY_URL port")
    service = vs.one("Service", vs.one("Deployment")["metadata"]["name"])
    p.check(service["spec"]["ports"][0]["targetPort"] == "gateway", "Service does not target the gateway port")

    wasm = init_env["FILTER_WASM"]
    copy = vs.container("copy-filter")
    p.check(copy["command"][-1] == wasm, "copy-filter does not write FILTER_WASM")
    p.check(vs.volume_at(copy, wasm) == vs.volume_at(proxy, wasm) is not None, "FILTER_WASM is not shared with the proxy")

    pod_path, local = vs.render(workdir)
    p.check(vs.volume_at(init, pod_path) == vs.volume_at(proxy, pod_path) is not None, "the rendered file is not shared with the proxy")
    volume = vs.volume_at(init, init["command"][1])
    templates = vs.one("ConfigMap", volume["configMap"]["name"])["data"]
    for name in ("render.py", "production.yaml.tmpl"):
        p.check(templates.get(name) == read(f"envoy/{name}"), f"ConfigMap {name} differs from envoy/{name}")
    with open(local) as f:
        config = yaml.safe_load(f)

    wasm_cfg = wasm_config(config)
    p.check(wasm_cfg["allow_on_headers_stop_iteration"] is True, "allow_on_headers_stop_iteration is not true")
    p.check(wasm_cfg["fail_open"] is False, "the filter must fail closed")
    p.check(wasm_cfg["vm_config"]["code"]["local"]["filename"] == wasm, "the configuration loads another .wasm than FILTER_WASM")
    plugin = json.loads(wasm_cfg["configuration"]["value"])
    unknown = set(plugin) - FILTER_FIELDS
    p.check(not unknown, f"plugin configuration fields {sorted(unknown)} not in filter/src/config.rs RawConfig")
    p.check(plugin.get("sidecar_cluster", SIDECAR_CLUSTER) == SIDECAR_CLUSTER, "sidecar_cluster is not the default")
    p.check(plugin["mirror_vectors"] == (side_env["MIRROR_VECTORS"] == "true"), "filter and sidecar disagree on MIRROR_VECTORS")
    p.check(int(side_env["SIDECAR_MAX_BODY_BYTES"]) >= plugin["max_body_bytes"], "the sidecar refuses bodies the filter forwards")
    if plugin["auth_mode"] == "keys":
        p.check("GATEWAY_API_KEY" in side_env, "keys mode: the sidecar needs GATEWAY_API_KEY")

    summary = f"gateway :{gateway.port}, sidecar :{sidecar_port}, {len(side_env) + len(init_env)} env vars, {len(plugin)} plugin fields"
    if vs.istio:
        check_istio(vs, p, pod_path, gateway.port, sidecar_port, vs.render(workdir, ecds=False)[1])
    else:
        args = proxy["args"]
        p.check(args[args.index("-c") + 1] == pod_path, "envoy -c is not the rendered configuration")
        sidecar_cluster = clusters_by_name(config).get(SIDECAR_CLUSTER)
        p.check(sidecar_cluster is not None and endpoint(sidecar_cluster) == ("127.0.0.1", sidecar_port),
                f"rendered cluster {SIDECAR_CLUSTER} is not 127.0.0.1:{sidecar_port}")
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
        p.check(listener["port_value"] == gateway.port, "rendered listener port != GATEWAY_URL port")
    return summary


def check_istio(vs, p, ecds_path, gateway_port, sidecar_port, full_config_path):
    with open(full_config_path) as f:
        buffer = yaml.safe_load(f)["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"]
    host = vs.env(vs.container("render-config"))["TURBOPUFFER_REGION"] + ".turbopuffer.com"
    labels = vs.pod["metadata"]["labels"]
    patches = vs.one("EnvoyFilter")["spec"]["configPatches"]
    selector = vs.one("EnvoyFilter")["spec"]["workloadSelector"]["labels"]
    p.check(selector.items() <= labels.items(), "EnvoyFilter does not select the gateway pods")
    p.check(vs.one("Gateway")["spec"]["selector"].items() <= labels.items(), "Gateway does not select the gateway pods")
    p.check(all(p_["match"]["context"] == "GATEWAY" for p_ in patches), "every patch must apply to the gateway only")

    added = [x["patch"]["value"] for x in patches if x["applyTo"] == "CLUSTER" and x["patch"]["operation"] == "ADD"]
    p.check([c["name"] for c in added] == [SIDECAR_CLUSTER], f"EnvoyFilter must add exactly the cluster {SIDECAR_CLUSTER}")
    p.check(added and endpoint(added[0]) == ("127.0.0.1", sidecar_port), f"{SIDECAR_CLUSTER} is not 127.0.0.1:{sidecar_port}")
    p.check(added and added[0]["load_assignment"]["cluster_name"] == SIDECAR_CLUSTER, "load_assignment names another cluster")
    limits = [x["patch"]["value"]["per_connection_buffer_limit_bytes"] for x in patches if x["applyTo"] in ("CLUSTER", "LISTENER")]
    p.check(len(limits) == 3 and set(limits) == {buffer}, f"buffer limits {limits} differ from render.py's {buffer}")

    for x in patches:
        listener = x["match"].get("listener")
        p.check(listener is None or listener["portNumber"] == gateway_port, "an EnvoyFilter listener match misses the gateway port")
        cluster = x["match"].get("cluster")
        p.check(cluster is None or cluster == {"service": host, "portNumber": 443}, "the Turbopuffer cluster match is off")
    http = next(x["patch"]["value"] for x in patches if x["applyTo"] == "HTTP_FILTER")
    p.check(http["config_discovery"]["config_source"]["path_config_source"]["path"] == ecds_path, "EnvoyFilter reads another file than render-config writes")
    p.check(vs.one("Gateway")["spec"]["servers"][0]["port"]["number"] == gateway_port, "Gateway port != GATEWAY_URL port")
    route = vs.one("VirtualService")["spec"]["http"][0]
    p.check(route["route"][0]["destination"] == {"host": host, "port": {"number": 443}}, "VirtualService routes elsewhere")
    p.check(vs.one("ServiceEntry")["spec"]["hosts"] == [host], "ServiceEntry host is not the region's")
    p.check(vs.one("DestinationRule")["spec"]["host"] == host, "DestinationRule host is not the region's")


def check_aerospike(vs, p):
    hosts = vs.env(vs.container("sidecar")).get("AEROSPIKE_HOSTS")
    if not vs.objects("StatefulSet"):
        p.check(hosts is None, "AEROSPIKE_HOSTS set without an Aerospike StatefulSet")
        return
    sts = vs.one("StatefulSet")
    name, service = sts["metadata"]["name"], sts["spec"]["serviceName"]
    config_map = next(v["configMap"]["name"] for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    conf = vs.one("ConfigMap", config_map)["data"]["aerospike.conf"]
    port = int(re.search(r"service \{\s*port (\d+)", conf).group(1))
    namespace = re.search(r"^namespace (\S+) \{", conf, re.M).group(1)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    expected = [f"{name}-{i}.{service}:{port}" for i in range(sts["spec"]["replicas"])]
    p.check(hosts is not None and hosts.split(",") == expected, f"AEROSPIKE_HOSTS {hosts} != the StatefulSet's pods {expected}")
    p.check(vs.env(vs.container("sidecar"))["AEROSPIKE_NAMESPACE"] == namespace, "AEROSPIKE_NAMESPACE is not aerospike.conf's")
    p.check(vs.port(container, "service") == port, "Aerospike containerPort != aerospike.conf service port")
    headless = vs.one("Service", service)["spec"]
    p.check(headless.get("clusterIP") == "None", "the Aerospike Service is not headless")
    p.check(any(x["port"] == port for x in headless["ports"]), "the headless Service lacks the service port")
    p.check(conf.count("{") == conf.count("}"), "aerospike.conf braces do not balance")
    p.check(int(re.search(r"^\s*nsup-period (\d+)$", conf, re.M).group(1)) > 0, "nsup-period 0: Aerospike refuses the sidecar's TTL writes")
    for setting in ("stop-writes-used-pct", "stop-writes-avail-pct", "stop-writes-sys-memory-pct"):
        p.check(setting in conf, f"aerospike.conf lacks {setting}")


def main():
    directory = sys.argv[1]
    failed = False
    defaults = Problems()
    check_chart_defaults(defaults)
    for vs in value_sets(directory):
        problems = Problems(defaults)
        with tempfile.TemporaryDirectory() as workdir:
            summary = check_pod(vs, problems, workdir)
        check_aerospike(vs, problems)
        if problems:
            failed = True
            print(f"DRIFT {vs.name}:\n  " + "\n  ".join(problems))
        else:
            print(f"no drift in {vs.name}: {summary}, cluster {SIDECAR_CLUSTER}, secrets referenced, paths shared"
                  + (", Aerospike wiring" if vs.objects("StatefulSet") else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
