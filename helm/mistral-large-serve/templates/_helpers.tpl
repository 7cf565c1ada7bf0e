{{/* Names. The RayService name is kept short: KubeRay appends a cluster suffix and
pod suffixes, and label values stop at 63 characters. */}}
{{- define "mls.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "mls.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mls.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mls.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mls.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mls.labels" -}}
helm.sh/chart: {{ include "mls.chart" . }}
{{ include "mls.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mls.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-ray" (include "mls.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mls.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "mls.serveServiceName" -}}
{{- printf "%s-openai" (include "mls.fullname" .) }}
{{- end }}

{{- define "mls.redisName" -}}
{{- printf "%s-redis" (include "mls.fullname" .) }}
{{- end }}

{{- define "mls.redisSecretName" -}}
{{- default (include "mls.redisName" .) .Values.redis.existingSecret }}
{{- end }}

{{- define "mls.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "mls.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Selector of every Ray pod (head and workers) of this release. */}}
{{- define "mls.raySelector" -}}
matchLabels:
  {{- include "mls.selectorLabels" . | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: In, values: [ray-head, ray-worker]}
{{- end }}

{{/* Environment of every Ray container: where the app finds Redis, API key hashes
and the OpenTelemetry collector. Values come from Secrets, never from the spec. */}}
{{- define "mls.appEnv" -}}
{{- if and .Values.sessions.enabled .Values.redis.enabled }}
- name: {{ .Values.sessions.redisUrlEnv }}
  valueFrom:
    secretKeyRef:
      name: {{ include "mls.redisSecretName" . }}
      key: {{ .Values.redis.urlKey }}
{{- end }}
{{- if and .Values.auth.enabled .Values.auth.apiKeysEnv (or .Values.auth.existingSecret .Values.auth.tenants) }}
- name: {{ .Values.auth.apiKeysEnv }}
  valueFrom:
    secretKeyRef:
      name: {{ include "mls.apiKeysSecretName" . }}
      key: {{ .Values.auth.secretKey }}
{{- end }}
{{- with .Values.telemetry.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ .Values.telemetry.serviceName | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Init container that syncs the checkpoint (or, for the head, only the tokenizer and
config files the gateway needs) from the object store. $full: include safetensors. */}}
{{- define "mls.weightsFetch" -}}
{{- $root := .root -}}
{{- $os := $root.Values.weights.objectStore -}}
- name: fetch-weights
  image: "{{ $os.image.repository }}:{{ $os.image.tag }}"
  imagePullPolicy: {{ $os.image.pullPolicy }}
  command: ["/bin/sh", "-c"]
  args:
    - |
      set -eu
      mkdir -p "$MODEL_PATH"
      aws s3 sync "$WEIGHTS_URI" "$MODEL_PATH" --only-show-errors --no-progress --exclude '*' \
      {{- range $os.include }}
      {{- if or $.full (not (hasSuffix ".safetensors" .)) }}
        --include {{ . | squote }} \
      {{- end }}
      {{- end }}
        --exclude '.*'
      {{- if .full }}
      ls "$MODEL_PATH"/*.safetensors > /dev/null || { echo "no .safetensors under $WEIGHTS_URI" >&2; exit 1; }
      {{- end }}
      echo "weights ready in $MODEL_PATH"
  env:
    - {name: WEIGHTS_URI, value: {{ $os.uri | quote }}}
    - {name: MODEL_PATH, value: {{ $root.Values.weights.modelPath | quote }}}
    - {name: HOME, value: /tmp}
    {{- with $os.endpointUrl }}
    - {name: AWS_ENDPOINT_URL, value: {{ . | quote }}}
    {{- end }}
    {{- with $os.region }}
    - {name: AWS_REGION, value: {{ . | quote }}}
    {{- end }}
  {{- with $os.credentialsSecret }}
  envFrom:
    - secretRef: {name: {{ . }}}
  {{- end }}
  resources:
    {{- toYaml $os.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: weights, mountPath: {{ $root.Values.weights.mountPath }}}
    - {name: tmp, mountPath: /tmp}
{{- end }}

{{/* Volumes of a Ray pod. $shm: /dev/shm size; $weightsSize: emptyDir limit for fetched weights. */}}
{{- define "mls.rayVolumes" -}}
{{- $root := .root -}}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ .shm }}}
- name: tmp
  emptyDir: {sizeLimit: {{ .tmp }}}
{{- if eq $root.Values.weights.source "pvc" }}
- name: weights
  persistentVolumeClaim: {claimName: {{ $root.Values.weights.pvc.claimName }}, readOnly: true}
{{- else if eq $root.Values.weights.source "objectStore" }}
- name: weights
  emptyDir: {sizeLimit: {{ .weightsSize }}}
{{- end }}
{{- end }}

{{- define "mls.rayVolumeMounts" -}}
- {name: shm, mountPath: /dev/shm}
- {name: tmp, mountPath: /tmp}
{{- if ne .Values.weights.source "none" }}
- {name: weights, mountPath: {{ .Values.weights.mountPath }}, readOnly: true}
{{- end }}
{{- end }}

{{- define "mls.runbookUrl" -}}
{{- printf "%s/%s" (trimSuffix "/" .root.Values.monitoring.runbookBaseUrl) .file }}
{{- end }}
