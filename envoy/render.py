#!/usr/bin/env python3
"""Renders an Envoy configuration for the Layer gateway from a template and the environment.

    render.py --profile local|production --out FILE

Environment (all optional; defaults in brackets):
  GATEWAY_PORT [8080]  ADMIN_PORT [9901]  SIDECAR_PORT [9090]  MINIFUGU_PORT [8787]
  FILTER_WASM [target/wasm32-wasip1/release/hevlayer_filter.wasm]  ACCESS_LOG [/dev/stdout]
  MAX_BODY_BYTES [268435456]  ROUTE_TIMEOUT [60s]  MIRROR_TIMEOUT_MS [200]  SIDECAR_TIMEOUT_MS [30000]
  MIRROR_VECTORS [false] (also read by the sidecar)  READ_WATERMARK [eventual] (eventual|always|off)
  Upstream (local profile): TURBOPUFFER_URL (any http/https base URL), else TURBOPUFFER_API_KEY with
    TURBOPUFFER_REGION (TLS to {region}.turbopuffer.com:443), else minifugu on 127.0.0.1:MINIFUGU_PORT.
  Auth: AUTH_MODE [passthrough for local, keys for production]; in keys mode GATEWAY_KEYS="name:sha256hex:scope,..." and
    TURBOPUFFER_API_KEY (the upstream key) are required.
  Production profile: TURBOPUFFER_REGION (required), CA_BUNDLE [/etc/ssl/certs/ca-certificates.crt].
  HEVLAYER_FILTER=off renders the local profile without the filter (the benchmark's baseline).
  Tracing (either profile): OTEL_COLLECTOR=host:port turns on Envoy's OpenTelemetry tracer, exporting
    spans over OTLP/gRPC to that collector (e.g. otel-collector:4317); OTEL_SAMPLING_PERCENT [100].
    Unset, the templates' tracing blocks are left out.
  --ecds writes only the profile's hevlayer wasm filter, as an extension-config (ECDS) resource file
    for an Envoy whose listeners come from elsewhere (the Istio gateway in envoy/kubernetes/).
"""

import argparse
import json
import os
import re
import string
import sys
import textwrap
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def fail(message):
    sys.exit(f"render.py: {message}")


def env(name, default=None):
    value = os.environ.get(name, "")
    return value if value != "" else default


def port(name, default):
    value = env(name, str(default))
    if not value.isdigit() or not 0 < int(value) < 65536:
        fail(f"{name} must be a TCP port, got {value!r}")
    return value


def positive(name, default):
    value = env(name, str(default))
    if not value.isdigit() or int(value) == 0:
        fail(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def bounded(name, default, low, high):
    value = env(name, str(default))
    if not value.isdigit() or not low <= int(value) <= high:
        fail(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


def plugin_config(profile):
    config = {
        "max_body_bytes": positive("MAX_BODY_BYTES", 268435456),
        "mirror_timeout_ms": positive("MIRROR_TIMEOUT_MS", 200),
        "sidecar_timeout_ms": positive("SIDECAR_TIMEOUT_MS", 30000),
    }
    mirror_vectors = env("MIRROR_VECTORS", "false").lower()
    if mirror_vectors not in ("true", "false", "1", "0"):
        fail(f"MIRROR_VECTORS must be true or false, got {mirror_vectors!r}")
    # The sidecar reads the same variable: both sides agree on whether the cache keeps vectors.
    config["mirror_vectors"] = mirror_vectors in ("true", "1")
    read_watermark = env("READ_WATERMARK", "eventual")
    if read_watermark not in ("eventual", "always", "off"):
        fail(f"READ_WATERMARK must be eventual, always or off, got {read_watermark!r}")
    config["read_watermark"] = read_watermark
    evict_ahead = env("EVICT_AHEAD_MAX_IDS", "10000")
    if not evict_ahead.isdigit():
        fail(f"EVICT_AHEAD_MAX_IDS must be a non-negative integer, got {evict_ahead!r}")
    config["evict_ahead_max_ids"] = int(evict_ahead)
    config["mirror_linger_ms"] = bounded("MIRROR_LINGER_MS", 2, 0, 1000)
    config["mirror_linger_max_ms"] = bounded("MIRROR_LINGER_MAX_MS", 20, 0, 1000)
    config["mirror_ride_bytes"] = bounded("MIRROR_RIDE_BYTES", 65536, 0, 1048576)
    group = env("GROUP_EVICTIONS", "adaptive")
    if group not in ("adaptive", "always", "off"):
        fail(f"GROUP_EVICTIONS must be adaptive, always or off, got {group!r}")
    config["group_evictions"] = group
    config["counter_batch"] = bounded("COUNTER_BATCH", 64, 1, 10000)
    # Production means gateway keys unless passthrough is asked for by name.
    mode = env("AUTH_MODE", "keys" if profile == "production" else "passthrough")
    if mode not in ("passthrough", "keys"):
        fail(f"AUTH_MODE must be passthrough or keys, got {mode!r}")
    config["auth_mode"] = mode
    if mode == "keys":
        keys = []
        for entry in filter(None, env("GATEWAY_KEYS", "").split(",")):
            parts = entry.strip().split(":")
            if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{64}", parts[1]) or parts[2] not in ("read", "write", "admin"):
                fail(f"GATEWAY_KEYS entries are name:sha256hex:read|write|admin, got {entry!r}")
            keys.append({"name": parts[0], "sha256": parts[1], "scope": parts[2]})
        if not keys:
            fail("AUTH_MODE=keys needs GATEWAY_KEYS")
        upstream = env("TURBOPUFFER_API_KEY")
        if not upstream:
            fail("AUTH_MODE=keys needs TURBOPUFFER_API_KEY (the key sent upstream)")
        config["keys"] = keys
        config["upstream_api_key"] = upstream
    return json.dumps(config, separators=(",", ":")).replace("'", "''")


def tls_socket(host, is_ip, indent):
    """Upstream TLS that checks the chain and that the certificate names `host`."""
    pad = " " * indent
    ca = env("CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    # SNI carries host names only; an IP address is matched against the certificate's IP SANs.
    sni = [] if is_ip else [f"    sni: {host}"]
    return "\n".join(
        pad + line
        for line in [
            "transport_socket:",
            "  name: envoy.transport_sockets.tls",
            "  typed_config:",
            '    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext',
            *sni,
            "    common_tls_context:",
            "      validation_context:",
            f"        trusted_ca: {{ filename: {ca} }}",
            "        match_typed_subject_alt_names:",
            f"        - san_type: {'IP_ADDRESS' if is_ip else 'DNS'}",
            f"          matcher: {{ exact: {host} }}",
        ]
    )


def upstream():
    """(host, port, discovery, tls block, host rewrite block) for the local profile."""
    url = env("TURBOPUFFER_URL")
    if url:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            fail(f"TURBOPUFFER_URL must be an http(s) base URL, got {url!r}")
        tls = parsed.scheme == "https"
        host = parsed.hostname
        upstream_port = parsed.port or (443 if tls else 80)
    elif env("TURBOPUFFER_API_KEY"):
        region = env("TURBOPUFFER_REGION")
        if not region or not re.fullmatch(r"[a-z0-9-]+", region):
            fail("TURBOPUFFER_API_KEY is set: TURBOPUFFER_REGION (e.g. aws-us-east-1) is required too")
        host, upstream_port, tls = f"{region}.turbopuffer.com", 443, True
    else:
        host, upstream_port, tls = "127.0.0.1", int(port("MINIFUGU_PORT", 8787)), False
    is_ip = re.fullmatch(r"[0-9.]+", host) is not None
    discovery = "STATIC" if is_ip else "LOGICAL_DNS"
    tls_block = tls_socket(host, is_ip, 4) if tls else ""
    rewrite = "" if is_ip else f"                  host_rewrite_literal: {host}"
    return host, str(upstream_port), discovery, tls_block, rewrite


def tracing(template):
    """The template with its tracing blocks kept (OTEL_COLLECTOR set) or removed, and their values."""
    collector = env("OTEL_COLLECTOR")
    if collector is None:
        return re.sub(r"\n *# BEGIN tracing.*?# END tracing", "", template, flags=re.S), {}
    found = re.fullmatch(r"([A-Za-z0-9.-]+):([0-9]+)", collector)
    if not found or not 0 < int(found.group(2)) < 65536:
        fail(f"OTEL_COLLECTOR must be host:port (the collector's OTLP/gRPC receiver), got {collector!r}")
    host = found.group(1)
    percent = env("OTEL_SAMPLING_PERCENT", "100")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", percent) or float(percent) > 100:
        fail(f"OTEL_SAMPLING_PERCENT must be a number from 0 to 100, got {percent!r}")
    is_ip = re.fullmatch(r"[0-9.]+", host) is not None
    return template, {
        "OTEL_HOST": host,
        "OTEL_PORT": found.group(2),
        "OTEL_DISCOVERY": "STATIC" if is_ip else "STRICT_DNS",
        "OTEL_SAMPLING_PERCENT": percent,
    }


def ecds_resource(rendered):
    """The hevlayer wasm filter of a rendered configuration as an ECDS resource file.

    Cut from the rendered template rather than written again, so the filter settings
    (allow_on_headers_stop_iteration, fail_open, vm_config) cannot differ between deployments."""
    found = re.search(
        r"^( *)- name: envoy\.filters\.http\.wasm\n\1  typed_config:\n((?:\1    .*\n)+)", rendered, flags=re.M
    )
    if not found:
        fail("the template has no envoy.filters.http.wasm filter to write as an ECDS resource")
    typed_config = textwrap.indent(textwrap.dedent(found.group(2)), "    ")
    return (
        "# The hevlayer filter as an extension-config (ECDS) resource, rendered by envoy/render.py --ecds.\n"
        "resources:\n"
        '- "@type": type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\n'
        "  name: hevlayer\n"
        "  typed_config:\n" + typed_config
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["local", "production"], default="local")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ecds", action="store_true", help="write only the wasm filter, as an ECDS resource")
    args = parser.parse_args()

    wasm = env("FILTER_WASM", os.path.join(ROOT, "target/wasm32-wasip1/release/hevlayer_filter.wasm"))
    values = {
        "GATEWAY_PORT": port("GATEWAY_PORT", 8080),
        "ADMIN_PORT": port("ADMIN_PORT", 9901),
        "SIDECAR_PORT": port("SIDECAR_PORT", 9090),
        # Envoy's buffers get 1 MiB of headroom over the filter's limit, so the filter's own
        # JSON 413 decides (the filter also rewrites Envoy's plain one, should it come first).
        "BUFFER_LIMIT_BYTES": str(positive("MAX_BODY_BYTES", 268435456) + 1048576),
        "ROUTE_TIMEOUT": env("ROUTE_TIMEOUT", "60s"),
        "PLUGIN_CONFIG": plugin_config(args.profile),
        "FILTER_WASM": os.path.abspath(wasm),
        "ACCESS_LOG": env("ACCESS_LOG", "/dev/stdout"),
        "CA_BUNDLE": env("CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"),
    }
    if not re.fullmatch(r"[0-9]+(ms|s)", values["ROUTE_TIMEOUT"]):
        fail(f"ROUTE_TIMEOUT must look like 60s or 500ms, got {values['ROUTE_TIMEOUT']!r}")
    if args.profile == "local":
        host, upstream_port, discovery, tls_block, rewrite = upstream()
        values.update(
            UPSTREAM_HOST=host,
            UPSTREAM_PORT=upstream_port,
            UPSTREAM_DISCOVERY=discovery,
            UPSTREAM_TLS=tls_block,
            HOST_REWRITE=rewrite,
        )
    else:
        region = env("TURBOPUFFER_REGION")
        if not region or not re.fullmatch(r"[a-z0-9-]+", region):
            fail("the production profile needs TURBOPUFFER_REGION (e.g. aws-us-east-1)")
        values["TURBOPUFFER_REGION"] = region
    with open(os.path.join(HERE, f"{args.profile}.yaml.tmpl")) as f:
        text, tracing_values = tracing(f.read())
    values.update(tracing_values)
    template = string.Template(text)
    try:
        rendered = template.substitute(values)
    except KeyError as missing:
        fail(f"template placeholder {missing} has no value")
    if env("HEVLAYER_FILTER", "on") == "off":
        # The same Envoy without the filter: the baseline of the gateway benchmark.
        rendered = re.sub(r"\n *# BEGIN hevlayer filter.*?# END hevlayer filter", "", rendered, flags=re.S)
    if args.ecds:
        rendered = ecds_resource(rendered)
    with open(args.out, "w") as f:
        f.write(rendered)


if __name__ == "__main__":
    main()
