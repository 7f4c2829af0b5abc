#!/usr/bin/env python3
"""Lints and renders the chart with every values set in envoy/kubernetes/values/.

    render_all.py --helm HELM --out DIR

For each values set NAME it writes DIR/NAME/manifests.yaml (everything), DIR/NAME/core.yaml (the
Kubernetes kinds, for kubernetes-validate), DIR/NAME/istio.json (the Istio kinds, for istio.mjs)
and DIR/NAME/monitoring.json (the Prometheus Operator's kinds, for monitoring.py).
A chart rendered without the values that have no default must fail, and say which one is missing.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(os.path.dirname(HERE), "chart")
VALUES = os.path.join(os.path.dirname(HERE), "values")


def helm(binary, *args):
    result = subprocess.run([binary, *args], capture_output=True, text=True)
    # Helm notes the chart's links to envoy/render.py and the template on stderr: not a problem.
    noise = [line for line in result.stderr.splitlines() if "found symbolic link" not in line]
    return result.returncode, result.stdout, "\n".join(noise)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--helm", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    code, _, err = helm(args.helm, "template", "hevlayer", CHART)
    if code == 0 or "turbopuffer.region is required" not in err:
        sys.exit(f"rendering without values must fail on the missing region, got: {err or 'success'}")

    shutil.rmtree(args.out, ignore_errors=True)
    for values in sorted(glob.glob(os.path.join(VALUES, "*.yaml"))):
        name = os.path.basename(values)[: -len(".yaml")]
        for command in (["lint", "--strict", CHART, "-f", values], ["template", "hevlayer", CHART, "-f", values]):
            code, out, err = helm(args.helm, *command)
            if code != 0:
                sys.exit(f"helm {command[0]} {name}: failed\n{out}{err}")
        docs = [d for d in yaml.safe_load_all(out) if d]
        istio = [d for d in docs if ".istio.io/" in d["apiVersion"]]
        monitoring = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
        core = [d for d in docs if d not in istio and d not in monitoring]
        target = os.path.join(args.out, name)
        os.makedirs(target)
        with open(os.path.join(target, "manifests.yaml"), "w") as f:
            f.write(out)
        with open(os.path.join(target, "core.yaml"), "w") as f:
            yaml.safe_dump_all(core, f, sort_keys=False)
        with open(os.path.join(target, "istio.json"), "w") as f:
            json.dump(istio, f)
        with open(os.path.join(target, "monitoring.json"), "w") as f:
            json.dump(monitoring, f)
        kinds = ", ".join(sorted({d["kind"] for d in docs}))
        print(f"helm lint --strict + template {name}: {len(docs)} objects ({kinds})")


if __name__ == "__main__":
    main()
