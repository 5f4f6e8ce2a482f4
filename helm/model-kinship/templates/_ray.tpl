{{/*
The pod template of a Ray node (the RayCluster's head or a worker group). KubeRay adds the
`ray start` command and the head address; this template brings the image, the security
context of the server's pods, health probes that need no wget, and the volumes.
Called with (dict "root" $ "role" "head"|"worker" "group" <values of the head or workers>).
*/}}
{{- define "model-kinship.rayPodTemplate" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $worker := eq .role "worker" }}
metadata:
  # Not the server's selector labels (component: server): the Service must not route to Ray pods.
  labels:
    {{- include "model-kinship.rayLabels" (dict "root" $root "component" (printf "ray-%s" .role)) | nindent 4 }}
  annotations:
    kubectl.kubernetes.io/default-container: ray-{{ .role }}
spec:
  serviceAccountName: {{ include "model-kinship.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and $worker $group.runtimeClassName }}
  runtimeClassName: {{ $group.runtimeClassName }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "model-kinship.rayImage" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      {{- if not $worker }}
      ports:
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: {{ $root.Values.ray.cluster.clientPort }}
          protocol: TCP
      {{- end }}
      env:
        - name: HOME
          value: /home/kinship
        - name: XDG_CACHE_HOME
          value: /home/kinship/.cache
        - name: TRITON_CACHE_DIR
          value: /home/kinship/.cache/triton
        {{- if $worker }}
        # The same paths as in the server pods, so paths handed to Ray tasks are valid here.
        - name: KINSHIP_ALLOWED_ROOTS
          value: {{ join ":" $root.Values.config.allowedRoots | quote }}
        - name: KINSHIP_OUTPUT_ROOT
          value: /var/lib/model-kinship/merges
        {{- end }}
      # Ray's own health endpoints, asked with the image's Python (the image has no wget,
      # which KubeRay's default probes use).
      readinessProbe:
        exec:
          command:
            - python
            - -c
            - {{ include "model-kinship.rayHealthScript" (dict "head" (not $worker)) | quote }}
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 5
        failureThreshold: 10
      livenessProbe:
        exec:
          command:
            - python
            - -c
            - {{ include "model-kinship.rayHealthScript" (dict "head" (not $worker)) | quote }}
        initialDelaySeconds: 30
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 12
      {{- if $worker }}
      lifecycle:
        preStop:
          exec:
            command: ["ray", "stop"]
      {{- end }}
      resources:
        {{- $resources := deepCopy $group.resources }}
        {{- if and $worker (gt (int $group.gpus) 0) }}
        {{- $limits := default (dict) $resources.limits }}
        {{- $_ := set $limits $group.resourceName (int $group.gpus) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: home
          mountPath: /home/kinship
        - name: dshm
          mountPath: /dev/shm
        {{- if $worker }}
        - name: outputs
          mountPath: /var/lib/model-kinship/merges
        {{- if $root.Values.models.existingClaim }}
        - name: models
          mountPath: /models
          readOnly: true
          {{- with $root.Values.models.subPath }}
          subPath: {{ . }}
          {{- end }}
        {{- end }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ $root.Values.scratch.tmpSizeLimit }}
    - name: home
      emptyDir:
        sizeLimit: {{ $root.Values.scratch.homeSizeLimit }}
    # Ray's object store lives in /dev/shm; the container default (64 MiB) is far too small.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.ray.cluster.objectStoreSizeLimit }}
    {{- if $worker }}
    - name: outputs
      persistentVolumeClaim:
        claimName: {{ $root.Values.outputs.existingClaim }}
    {{- if $root.Values.models.existingClaim }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ $root.Values.models.existingClaim }}
        readOnly: true
    {{- end }}
    {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Python that exits 0 only when the local raylet (and on the head, the GCS) reports healthy. */}}
{{- define "model-kinship.rayHealthScript" -}}
import urllib.request as u; {{ if .head }}u.urlopen('http://127.0.0.1:8265/api/gcs_healthz', timeout=3); {{ end }}u.urlopen('http://127.0.0.1:52365/api/local_raylet_healthz', timeout=3)
{{- end }}

{{/* Standard labels of the Ray objects: the chart's, with their own component (never "server"). */}}
{{- define "model-kinship.rayLabels" -}}
helm.sh/chart: {{ include "model-kinship.chart" .root }}
app.kubernetes.io/name: {{ include "model-kinship.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: model-kinship
{{- end }}
