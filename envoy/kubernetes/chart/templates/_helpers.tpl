{{/* Names, labels and the checks every template relies on. */}}

{{- define "hevlayer.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "hevlayer.labels" -}}
app.kubernetes.io/name: hevlayer-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "hevlayer.gatewaySelector" -}}
app.kubernetes.io/name: hevlayer-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "hevlayer.aerospikeSelector" -}}
app.kubernetes.io/name: hevlayer-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: aerospike
{{- end -}}

{{/* Non-root, read-only root filesystem, no capabilities, RuntimeDefault seccomp. Argument: the uid. */}}
{{- define "hevlayer.securityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: { drop: [ALL] }
seccompProfile: { type: RuntimeDefault }
{{- end -}}

{{- define "hevlayer.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- define "hevlayer.turbopufferHost" -}}
{{- printf "%s.turbopuffer.com" .Values.turbopuffer.region -}}
{{- end -}}

{{/* Envoy's buffers get 1 MiB over the filter's limit, as envoy/render.py gives them. */}}
{{- define "hevlayer.bufferLimitBytes" -}}
{{- add (int64 .Values.filter.maxBodyBytes) 1048576 -}}
{{- end -}}

{{/* Where the pod's init containers leave the filter and the rendered configuration. */}}
{{- define "hevlayer.wasmPath" -}}/var/lib/hevlayer/filter/plugin.wasm{{- end -}}
{{- define "hevlayer.renderedDir" -}}/var/run/hevlayer/envoy{{- end -}}

{{- define "hevlayer.aerospikeName" -}}
{{- printf "%s-aerospike" (include "hevlayer.fullname" .) -}}
{{- end -}}

{{/* The StatefulSet's pods by their stable DNS names (headless Service), each with the service port. */}}
{{- define "hevlayer.aerospikeHosts" -}}
{{- $name := include "hevlayer.aerospikeName" . -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.aerospike.replicas) -}}
{{- $hosts = append $hosts (printf "%s-%d.%s:3000" $name $i $name) -}}
{{- end -}}
{{- join "," $hosts -}}
{{- end -}}

{{- define "hevlayer.validate" -}}
{{- if not (has .Values.mode (list "plain" "istio")) }}{{ fail "mode must be plain or istio" }}{{ end -}}
{{- if not (regexMatch "^[a-z0-9-]+$" .Values.turbopuffer.region) }}{{ fail "turbopuffer.region is required (e.g. aws-us-east-1)" }}{{ end -}}
{{- if not .Values.images.sidecar.repository }}{{ fail "images.sidecar.repository is required: build envoy/kubernetes/images/sidecar.Dockerfile" }}{{ end -}}
{{- if not .Values.images.filter.repository }}{{ fail "images.filter.repository is required: build envoy/kubernetes/images/filter.Dockerfile" }}{{ end -}}
{{- if not (has .Values.filter.authMode (list "keys" "passthrough")) }}{{ fail "filter.authMode must be keys or passthrough" }}{{ end -}}
{{- if not (has .Values.cache.backend (list "aerospike" "embedded")) }}{{ fail "cache.backend must be aerospike or embedded" }}{{ end -}}
{{- if and (eq .Values.cache.backend "embedded") (gt (int .Values.replicas) 1) }}{{ fail "cache.backend embedded keeps pipeline state per pod: use replicas 1, or aerospike" }}{{ end -}}
{{- if not (has .Values.aerospike.storage (list "file" "memory")) }}{{ fail "aerospike.storage must be file or memory" }}{{ end -}}
{{- end -}}
