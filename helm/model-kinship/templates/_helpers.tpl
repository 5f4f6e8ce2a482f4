{{/*
Names, labels and small computed values shared by the templates.
*/}}

{{- define "model-kinship.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, at most 63 characters (DNS label). */}}
{{- define "model-kinship.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "model-kinship.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "model-kinship.labels" -}}
helm.sh/chart: {{ include "model-kinship.chart" . }}
{{ include "model-kinship.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: model-kinship
{{- end }}

{{- define "model-kinship.selectorLabels" -}}
app.kubernetes.io/name: {{ include "model-kinship.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "model-kinship.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "model-kinship.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "model-kinship.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "true" when the cache is on a claim per pod: the workload is then a StatefulSet. */}}
{{- define "model-kinship.statefulset" -}}
{{- $p := .Values.cache.persistence }}
{{- if and $p.enabled (not $p.shared) (not $p.existingClaim) }}true{{ end }}
{{- end }}

{{/* Name of the shared cache claim (created by the chart or existing). */}}
{{- define "model-kinship.cacheClaimName" -}}
{{- default (printf "%s-cache" (include "model-kinship.fullname" .)) .Values.cache.persistence.existingClaim }}
{{- end }}

{{- define "model-kinship.authSecretName" -}}
{{- default (printf "%s-api-token" (include "model-kinship.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "model-kinship.hfSecretName" -}}
{{- default (printf "%s-hf-token" (include "model-kinship.fullname" .)) .Values.huggingface.existingSecret }}
{{- end }}

{{- define "model-kinship.stateSecretName" -}}
{{- default (printf "%s-state-url" (include "model-kinship.fullname" .)) .Values.state.existingSecret }}
{{- end }}

{{/* "true" when PostgreSQL holds the shared state (KINSHIP_STATE_URL is set). */}}
{{- define "model-kinship.sharedState" -}}
{{- if or .Values.state.existingSecret .Values.state.url }}true{{ end }}
{{- end }}

{{/* "true" when more than one server pod may run: replicaCount > 1, or an HPA that may scale past one. */}}
{{- define "model-kinship.severalReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.maxReplicas) 1 }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* Name of the KubeRay RayCluster; KubeRay names its head Service "<name>-head-svc". */}}
{{- define "model-kinship.rayClusterName" -}}
{{- printf "%s-ray" (include "model-kinship.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}

{{/* KINSHIP_RAY_ADDRESS: the external address, or Ray Client on this release's head service; empty: no Ray. */}}
{{- define "model-kinship.rayAddress" -}}
{{- if .Values.ray.cluster.enabled }}
{{- printf "ray://%s-head-svc.%s.svc:%v" (include "model-kinship.rayClusterName" .) .Release.Namespace .Values.ray.cluster.clientPort }}
{{- else }}
{{- .Values.ray.address }}
{{- end }}
{{- end }}

{{- define "model-kinship.rayImage" -}}
{{- $image := .Values.ray.cluster.image }}
{{- printf "%s:%s" (default .Values.image.repository $image.repository) (default (default .Chart.AppVersion .Values.image.tag) $image.tag) }}
{{- end }}

{{/* Seconds the kubelet waits after SIGTERM: above the server's drain + grace. */}}
{{- define "model-kinship.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.config.drainSeconds) (int .Values.config.graceSeconds) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 10 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.drainSeconds + config.graceSeconds (%v), or the kubelet kills the server before in-flight calls finish" .Values.terminationGracePeriodSeconds $needed) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Checks that combinations of values make sense; renders nothing. */}}
{{- define "model-kinship.validate" -}}
{{- if and .Values.auth.enabled (not .Values.auth.token) (not .Values.auth.existingSecret) }}
{{- fail "auth.enabled needs auth.token or auth.existingSecret (a Secret holding the API token)" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret: a kubernetes.io/tls Secret with tls.crt and tls.key (for example from cert-manager)" }}
{{- end }}
{{- $p := .Values.cache.persistence }}
{{- if and $p.enabled (or $p.shared $p.existingClaim) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "a shared cache claim (cache.persistence.shared or existingClaim) supports one pod: the cache and job registry use SQLite WAL, which does not work across nodes or on NFS. For several replicas set cache.persistence.shared=false (a claim per pod, StatefulSet)" }}
{{- end }}
{{- if include "model-kinship.severalReplicas" . }}
{{- if not (include "model-kinship.sharedState" .) }}
{{- fail "several replicas (replicaCount > 1, or autoscaling.maxReplicas > 1) need shared state: set state.existingSecret (a Secret with the PostgreSQL URL under state.existingSecretKey) or state.url. Without it a merge job started on one pod is NOT_FOUND on the next" }}
{{- end }}
{{- if not .Values.outputs.existingClaim }}
{{- fail "several replicas need the merge outputs on shared storage: set outputs.existingClaim to a ReadWriteMany claim, so a merge written by one pod is readable from every pod" }}
{{- end }}
{{- end }}
{{- if and .Values.ray.address .Values.ray.cluster.enabled }}
{{- fail "set ray.address (an existing Ray cluster) or ray.cluster.enabled (a RayCluster of this release), not both" }}
{{- end }}
{{- if and .Values.ray.cluster.enabled (not .Values.outputs.existingClaim) }}
{{- fail "ray.cluster.enabled needs outputs.existingClaim: a ReadWriteMany claim mounted by the server and the Ray workers, which write merge outputs there" }}
{{- end }}
{{- if and .Values.ray.address (not (regexMatch "^(ray://)?[A-Za-z0-9.-]+:[0-9]+$" .Values.ray.address)) }}
{{- fail (printf "ray.address %q: use ray://HOST:PORT (Ray Client, port 10001 by default) or HOST:PORT" .Values.ray.address) }}
{{- end }}
{{- if and .Values.state.url (not (regexMatch "^postgres(ql)?://" .Values.state.url)) }}
{{- fail "state.url must be a PostgreSQL URL: postgresql://USER:PASSWORD@HOST:5432/DATABASE" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled" }}
{{- end }}
{{- end }}
