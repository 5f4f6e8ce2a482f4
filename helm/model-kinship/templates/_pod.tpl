{{/*
The pod template of the server, used by the Deployment and the StatefulSet alike.
*/}}
{{- define "model-kinship.podTemplate" -}}
{{- $statefulset := include "model-kinship.statefulset" . }}
{{- $p := .Values.cache.persistence }}
metadata:
  labels:
    {{- include "model-kinship.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    kubectl.kubernetes.io/default-container: server
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "model-kinship.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and .Values.gpu.enabled .Values.gpu.runtimeClassName }}
  runtimeClassName: {{ .Values.gpu.runtimeClassName }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "model-kinship.terminationGracePeriodSeconds" . }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: server
      image: {{ include "model-kinship.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      ports:
        - name: grpc
          containerPort: {{ .Values.service.port }}
          protocol: TCP
        - name: metrics
          containerPort: {{ .Values.service.metricsPort }}
          protocol: TCP
        - name: grpc-health
          containerPort: {{ .Values.service.healthPort }}
          protocol: TCP
      env:
        - name: KINSHIP_HOST
          value: "0.0.0.0"
        - name: KINSHIP_PORT
          value: {{ .Values.service.port | quote }}
        - name: KINSHIP_METRICS_PORT
          value: {{ .Values.service.metricsPort | quote }}
        - name: KINSHIP_HEALTH_PORT
          value: {{ .Values.service.healthPort | quote }}
        - name: KINSHIP_DEVICE
          value: {{ if ne .Values.config.device "auto" }}{{ .Values.config.device | quote }}{{ else if .Values.gpu.enabled }}"cuda"{{ else }}"cpu"{{ end }}
        - name: KINSHIP_ALLOWED_ROOTS
          value: {{ join ":" .Values.config.allowedRoots | quote }}
        - name: KINSHIP_CACHE_DIR
          value: /var/cache/model-kinship/kinship
        - name: KINSHIP_CACHE_SIZE_LIMIT
          value: {{ .Values.cache.sizeLimit | quote }}
        - name: KINSHIP_OUTPUT_ROOT
          value: /var/lib/model-kinship/merges
        - name: KINSHIP_LOG_LEVEL
          value: {{ .Values.config.logLevel | quote }}
        - name: KINSHIP_LOG_FORMAT
          value: {{ .Values.config.logFormat | quote }}
        - name: KINSHIP_MAX_WORKERS
          value: {{ .Values.config.maxWorkers | quote }}
        - name: KINSHIP_MAX_MERGE_JOBS
          value: {{ .Values.config.maxMergeJobs | quote }}
        - name: KINSHIP_MAX_QUEUED_MERGE_JOBS
          value: {{ .Values.config.maxQueuedMergeJobs | quote }}
        - name: KINSHIP_MAX_MESSAGE_BYTES
          value: {{ .Values.config.maxMessageBytes | quote }}
        - name: KINSHIP_CHUNK_BYTES
          value: {{ .Values.config.chunkBytes | quote }}
        - name: KINSHIP_DRAIN_SECONDS
          value: {{ .Values.config.drainSeconds | quote }}
        - name: KINSHIP_GRACE_SECONDS
          value: {{ .Values.config.graceSeconds | quote }}
        {{- if include "model-kinship.sharedState" . }}
        - name: KINSHIP_STATE_URL
          valueFrom:
            secretKeyRef:
              name: {{ include "model-kinship.stateSecretName" . }}
              key: {{ .Values.state.existingSecretKey }}
        {{- end }}
        {{- with include "model-kinship.rayAddress" . }}
        - name: KINSHIP_RAY_ADDRESS
          value: {{ . | quote }}
        {{- end }}
        {{- if .Values.auth.enabled }}
        - name: KINSHIP_AUTH_TOKEN_FILE
          value: /var/run/secrets/model-kinship/api-token/token
        {{- end }}
        {{- if .Values.tls.enabled }}
        - name: KINSHIP_TLS_CERT_FILE
          value: /var/run/secrets/model-kinship/tls/tls.crt
        - name: KINSHIP_TLS_KEY_FILE
          value: /var/run/secrets/model-kinship/tls/tls.key
        {{- if .Values.tls.clientCA.enabled }}
        - name: KINSHIP_TLS_CLIENT_CA_FILE
          value: /var/run/secrets/model-kinship/client-ca/ca.crt
        {{- end }}
        {{- end }}
        - name: HOME
          value: /home/kinship
        - name: XDG_CACHE_HOME
          value: /home/kinship/.cache
        - name: TRITON_CACHE_DIR
          value: /home/kinship/.cache/triton
        - name: HF_HOME
          value: /var/cache/model-kinship/huggingface
        {{- if .Values.huggingface.offline }}
        - name: HF_HUB_OFFLINE
          value: "1"
        {{- end }}
        {{- if or .Values.huggingface.token .Values.huggingface.existingSecret }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "model-kinship.hfSecretName" . }}
              key: {{ .Values.huggingface.existingSecretKey }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        grpc:
          port: {{ .Values.service.healthPort }}
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
      livenessProbe:
        grpc:
          port: {{ .Values.service.healthPort }}
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
      readinessProbe:
        grpc:
          port: {{ .Values.service.healthPort }}
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
      resources:
        {{- $resources := deepCopy .Values.resources }}
        {{- if .Values.gpu.enabled }}
        {{- $limits := default (dict) $resources.limits }}
        {{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: /var/cache/model-kinship
        - name: outputs
          mountPath: /var/lib/model-kinship/merges
        - name: tmp
          mountPath: /tmp
        - name: home
          mountPath: /home/kinship
        {{- if .Values.models.existingClaim }}
        - name: models
          mountPath: /models
          readOnly: true
          {{- with .Values.models.subPath }}
          subPath: {{ . }}
          {{- end }}
        {{- end }}
        {{- if .Values.auth.enabled }}
        - name: api-token
          mountPath: /var/run/secrets/model-kinship/api-token
          readOnly: true
        {{- end }}
        {{- if .Values.tls.enabled }}
        - name: tls
          mountPath: /var/run/secrets/model-kinship/tls
          readOnly: true
        {{- if .Values.tls.clientCA.enabled }}
        - name: client-ca
          mountPath: /var/run/secrets/model-kinship/client-ca
          readOnly: true
        {{- end }}
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    {{- if not $statefulset }}
    - name: cache
      {{- if $p.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "model-kinship.cacheClaimName" . }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.cache.emptyDir.sizeLimit }}
      {{- end }}
    {{- end }}
    - name: outputs
      {{- if .Values.outputs.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ .Values.outputs.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.outputs.emptyDir.sizeLimit }}
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
    - name: home
      emptyDir:
        sizeLimit: {{ .Values.scratch.homeSizeLimit }}
    {{- if .Values.models.existingClaim }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ .Values.models.existingClaim }}
        readOnly: true
    {{- end }}
    {{- if .Values.auth.enabled }}
    - name: api-token
      secret:
        secretName: {{ include "model-kinship.authSecretName" . }}
        defaultMode: 0440
        items:
          - key: {{ .Values.auth.existingSecretKey }}
            path: token
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ .Values.tls.existingSecret }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- if .Values.tls.clientCA.enabled }}
    - name: client-ca
      secret:
        secretName: {{ default .Values.tls.existingSecret .Values.tls.clientCA.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ .Values.tls.clientCA.key }}
            path: ca.crt
    {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $nodeSelector := deepCopy .Values.nodeSelector }}
  {{- if .Values.gpu.enabled }}
  {{- $nodeSelector = merge $nodeSelector .Values.gpu.nodeSelector }}
  {{- end }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := .Values.tolerations }}
  {{- if .Values.gpu.enabled }}
  {{- $tolerations = concat .Values.tolerations .Values.gpu.tolerations }}
  {{- end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
