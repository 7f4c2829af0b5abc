"""What drift.py and envoy_check.py share: the rendered values sets and the gateway pod's parts."""

import glob
import hashlib
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# What the secrets hold, for rendering outside a cluster. The quote and the backslash prove that
# the renderer escapes what it puts into the plugin configuration.
SIDECAR_KEY = "check-gateway-key"
SECRET_VALUES = {
    "TURBOPUFFER_API_KEY": "tpuf_check'key\\",
    "GATEWAY_KEYS": "check:" + hashlib.sha256(SIDECAR_KEY.encode()).hexdigest() + ":admin",
    "GATEWAY_API_KEY": SIDECAR_KEY,
}


def value_sets(directory):
    """Every values set render_all.py rendered into directory."""
    return [ValueSet(d) for d in sorted(glob.glob(os.path.join(directory, "*", "")))]


class ValueSet:
    def __init__(self, directory):
        self.name = os.path.basename(os.path.normpath(directory))
        with open(os.path.join(directory, "manifests.yaml")) as f:
            self.docs = [d for d in yaml.safe_load_all(f) if d]
        self.pod = self.one("Deployment")["spec"]["template"]

    def objects(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind, name=None):
        found = [d for d in self.objects(kind) if name is None or d["metadata"]["name"] == name]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
        return found[0]

    @property
    def istio(self):
        return bool(self.objects("EnvoyFilter"))

    def container(self, name):
        spec = self.pod["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["name"] == name:
                return c
        raise AssertionError(f"no container {name}")

    @property
    def proxy(self):
        return self.container("istio-proxy" if self.istio else "envoy")

    def env(self, container):
        """The container's environment as the pod would see it, secrets from SECRET_VALUES."""
        values = {}
        for var in container.get("env", []):
            if "value" in var:
                values[var["name"]] = var["value"]
            else:
                assert "secretKeyRef" in var["valueFrom"], f"{var['name']}: only secrets are referenced"
                values[var["name"]] = SECRET_VALUES[var["name"]]
        return values

    def volume_at(self, container, path):
        """The volume whose mount in container holds path (the longest mount path that does)."""
        mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
        if not mounts:
            return None
        name = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
        return next(v for v in self.pod["spec"]["volumes"] if v["name"] == name)

    def port(self, container, name):
        return next(p["containerPort"] for p in container["ports"] if p["name"] == name)

    def render(self, workdir, ecds=True):
        """Runs the render-config init container the way the pod does, from the rendered ConfigMap.

        Returns (the path the pod writes, the file written here). ecds=False renders the full
        configuration even for an Istio values set (to compare its buffer limits)."""
        init = self.container("render-config")
        python, script, *args = init["command"]
        assert python == "python3", init["command"]
        volume = self.volume_at(init, script)
        templates = self.one("ConfigMap", volume["configMap"]["name"])["data"]
        os.makedirs(workdir, exist_ok=True)
        for name, text in templates.items():
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        pod_path = args[args.index("--out") + 1]
        local = os.path.join(workdir, ("" if ecds else "full-") + os.path.basename(pod_path))
        args = [local if a == pod_path else a for a in args if ecds or a != "--ecds"]
        env = {"PATH": os.environ["PATH"], **self.env(init)}
        subprocess.run([sys.executable, os.path.join(workdir, os.path.basename(script)), *args], env=env, check=True)
        return pod_path, local
