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

{{/* Selector of every Ray pod (head, gateway group and pool workers) of this release. */}}
{{- define "mls.raySelector" -}}
matchLabels:
  {{- include "mls.selectorLabels" . | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: In, values: [ray-head, ray-gateway, ray-worker]}
{{- end }}

{{/* Selector of the pods that take outside traffic (they declare the `serve` port). */}}
{{- define "mls.servingSelector" -}}
matchLabels:
  {{- include "mls.selectorLabels" . | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: In, values: [ray-head, ray-gateway]}
{{- end }}

{{/* The typed config (ClusterConfig) the app runs with, as JSON: parsed out of
serveConfigV2, so every setting the gateway reads (auth, sessions) is taken from the one
place the gateway takes it from. Empty object when serveConfigV2 is not the rendered
config (validate.yaml then fails with a clear message). */}}
{{- define "mls.appConfig" -}}
{{- $sc := fromYaml (default "" .Values.serveConfigV2) -}}
{{- $cfg := dict -}}
{{- if and (kindIs "map" $sc) (not (hasKey $sc "Error")) $sc.applications (kindIs "slice" $sc.applications) -}}
{{- $app := first $sc.applications -}}
{{- if and (kindIs "map" $app) $app.args (kindIs "map" $app.args) $app.args.cluster_config -}}
{{- $cfg = $app.args.cluster_config -}}
{{- end -}}
{{- end -}}
{{- $cfg | toJson -}}
{{- end }}

{{- define "mls.authEnabled" -}}
{{- $cfg := include "mls.appConfig" . | fromJson -}}
{{- if and $cfg.auth $cfg.auth.enabled }}true{{ end -}}
{{- end }}

{{- define "mls.sessionsEnabled" -}}
{{- $cfg := include "mls.appConfig" . | fromJson -}}
{{- if and $cfg.sessions $cfg.sessions.enabled }}true{{ end -}}
{{- end }}

{{/* Redis of the bundled mode: plain Service, or Sentinel. */}}
{{- define "mls.redisSentinel" -}}
{{- if and .Values.redis.enabled (eq .Values.redis.mode "bundled") .Values.redis.bundled.sentinel.enabled }}true{{ end -}}
{{- end }}

{{/* Host list of the bundled Redis as the app connects to it: the Sentinels (the app
asks them for the master) or the one Service. */}}
{{- define "mls.bundledRedisHosts" -}}
{{- $name := include "mls.redisName" . -}}
{{- if include "mls.redisSentinel" . -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.redis.bundled.sentinel.replicas) -}}
{{- $hosts = append $hosts (printf "%s-%d.%s-headless.%s.svc:26379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $hosts -}}
{{- else -}}
{{- printf "%s.%s.svc:6379" $name .Release.Namespace -}}
{{- end -}}
{{- end }}

{{- define "mls.gatewayEnabled" -}}
{{- if and .Values.gateway .Values.gateway.enabled }}true{{ end -}}
{{- end }}

{{/* Environment of every Ray container: where the app finds Redis, API key hashes
and the OpenTelemetry collector. Secrets only through secretKeyRef, never in the spec.
Which variables the app reads (and whether auth and sessions are on) comes from the
typed config inside serveConfigV2. */}}
{{- define "mls.appEnv" -}}
{{- $cfg := include "mls.appConfig" . | fromJson -}}
{{- $sessions := default (dict) $cfg.sessions -}}
{{- $auth := default (dict) $cfg.auth -}}
{{- if and $sessions.enabled .Values.redis.enabled $sessions.redis_url_env }}
{{- if eq .Values.redis.mode "bundled" }}
# The URL is assembled by the kubelet from the password Secret (no URL in any Secret or spec).
- name: MLS_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "mls.redisSecretName" . }}
      key: {{ .Values.redis.passwordKey }}
- name: {{ $sessions.redis_url_env }}
  value: {{ printf "%s://:$(MLS_REDIS_PASSWORD)@%s/0" (ternary "rediss" "redis" .Values.redis.bundled.tls.enabled) (include "mls.bundledRedisHosts" .) | quote }}
{{- else }}
- name: {{ $sessions.redis_url_env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "mls.redisSecretName" . }}
      key: {{ .Values.redis.urlKey }}
{{- end }}
{{- end }}
{{- if and $sessions.enabled (include "mls.redisSentinel" .) $sessions.sentinel_password_env }}
- name: {{ $sessions.sentinel_password_env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "mls.redisSecretName" . }}
      key: {{ .Values.redis.passwordKey }}
{{- end }}
{{- if and $auth.enabled $auth.api_keys_env (or .Values.auth.existingSecret .Values.auth.tenants) }}
- name: {{ $auth.api_keys_env }}
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
# The Serve controller stops a replica that failed its health check at once instead of
# draining it (deployments/serve_config.py:controller_env): it can finish nothing.
- name: RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS
  value: "1"
{{- if .Values.nodeCache.path }}
# torch.compile artifacts on the node cache: a restarted engine skips recompiling.
- name: VLLM_CACHE_ROOT
  value: /var/cache/vllm
{{- end }}
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

{{/* Credentials of the engines that stream their weights from the object store
(weights.source stream): the Secret's keys, named as runai-model-streamer reads them
(boto3 / the AWS SDK; HMAC keys for gs://). Engine pods only: the gateway and head never
read the bucket. Endpoint and addressing are in serveConfigV2 (the engines' runtime env). */}}
{{- define "mls.weightsStreamEnv" -}}
{{- if eq .Values.weights.source "stream" }}
{{- with .Values.weights.stream.credentialsSecret }}
- {name: AWS_ACCESS_KEY_ID, valueFrom: {secretKeyRef: {name: {{ . }}, key: AWS_ACCESS_KEY_ID}}}
- {name: AWS_SECRET_ACCESS_KEY, valueFrom: {secretKeyRef: {name: {{ . }}, key: AWS_SECRET_ACCESS_KEY}}}
- {name: AWS_SESSION_TOKEN, valueFrom: {secretKeyRef: {name: {{ . }}, key: AWS_SESSION_TOKEN, optional: true}}}
{{- end }}
{{- end }}
{{- end }}

{{/* Secret holding the CA bundle the app checks the Redis server against (rediss://). */}}
{{- define "mls.redisCaSecret" -}}
{{- if and .Values.redis.enabled (eq .Values.redis.mode "bundled") .Values.redis.bundled.tls.enabled -}}
{{- .Values.redis.bundled.tls.existingSecret -}}
{{- else if .Values.redis.enabled -}}
{{- .Values.redis.caSecret -}}
{{- end -}}
{{- end }}

{{/* Volumes of a Ray pod. $shm: /dev/shm size; $weightsSize: emptyDir limit for fetched weights. */}}
{{- define "mls.rayVolumes" -}}
{{- $root := .root -}}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ .shm }}}
- name: tmp
  emptyDir: {sizeLimit: {{ .tmp }}}
{{- $cache := $root.Values.nodeCache.path }}
{{- if eq $root.Values.weights.source "pvc" }}
- name: weights
  persistentVolumeClaim: {claimName: {{ $root.Values.weights.pvc.claimName }}, readOnly: true}
{{- else if and (eq $root.Values.weights.source "objectStore") $cache }}
# Survives the pod: a replacement on this node syncs only what changed.
- name: weights
  hostPath: {path: {{ printf "%s/weights" (trimSuffix "/" $cache) }}, type: Directory}
{{- else if eq $root.Values.weights.source "objectStore" }}
- name: weights
  emptyDir: {sizeLimit: {{ .weightsSize }}}
{{- end }}
{{- if $cache }}
- name: compile-cache
  hostPath: {path: {{ printf "%s/vllm" (trimSuffix "/" $cache) }}, type: Directory}
{{- end }}
{{- with include "mls.redisCaSecret" $root }}
- name: redis-ca
  secret: {secretName: {{ . }}, items: [{key: ca.crt, path: {{ base (include "mls.appConfig" $root | fromJson).sessions.tls_ca_file }}}]}
{{- end }}
{{- end }}

{{- define "mls.rayVolumeMounts" -}}
- {name: shm, mountPath: /dev/shm}
- {name: tmp, mountPath: /tmp}
{{- if has .Values.weights.source (list "pvc" "objectStore") }}
- {name: weights, mountPath: {{ .Values.weights.mountPath }}, readOnly: true}
{{- end }}
{{- if .Values.nodeCache.path }}
- {name: compile-cache, mountPath: /var/cache/vllm}
{{- end }}
{{- if include "mls.redisCaSecret" . }}
- {name: redis-ca, mountPath: {{ dir (include "mls.appConfig" . | fromJson).sessions.tls_ca_file }}, readOnly: true}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity in whole GiB, rounded up. */}}
{{- define "mls.gib" -}}
{{- $q := toString . -}}
{{- $num := regexFind "^[0-9.]+" $q -}}
{{- $unit := trimPrefix $num $q -}}
{{- $per := dict "Ki" 0.0000009537 "Mi" 0.0009765625 "Gi" 1.0 "Ti" 1024.0 "k" 0.00000093132 "M" 0.00093132 "G" 0.93132257 "T" 931.32257 "" 0.00000000093132 -}}
{{- if not (hasKey $per $unit) }}{{ fail (printf "cannot read the quantity %q (use Ki, Mi, Gi, Ti, k, M, G, T)" $q) }}{{ end -}}
{{- ceil (mulf (float64 $num) (get $per $unit)) | int -}}
{{- end }}

{{/* Requests and limits of a Ray container plus the ephemeral storage its disk volumes
can fill (emptyDirs for /tmp and fetched weights, logs): a pod is only scheduled where
the node has that much disk, instead of being evicted mid-load. */}}
{{- define "mls.resourcesWithDisk" -}}
{{- $root := .root -}}
{{- $gib := add (include "mls.gib" .tmp | int) 10 -}}
{{- if and (eq $root.Values.weights.source "objectStore") (not $root.Values.nodeCache.path) -}}
{{- $gib = add $gib (include "mls.gib" .weightsSize | int) -}}
{{- end -}}
{{- $res := deepCopy .resources -}}
{{- $_ := set $res.requests "ephemeral-storage" (printf "%dGi" $gib) -}}
{{- toYaml $res -}}
{{- end }}

{{- define "mls.runbookUrl" -}}
{{- printf "%s/%s" (trimSuffix "/" .root.Values.monitoring.runbookBaseUrl) .file }}
{{- end }}

{{/* A pool's compile-cache volume (workerGroups[].compileCache, from the typed config's
engine.compile_cache): a hostPath on the node (its hostPath, else <nodeCache.path>/vllm),
a shared claim, or an emptyDir. Nothing when the pool has none. */}}
{{- define "mls.engineCompileCacheVolume" -}}
{{- $c := .group.compileCache | default dict -}}
{{- if $c.enabled }}
- name: engine-compile-cache
{{- if eq $c.volume "node" }}
{{- $path := $c.hostPath | default (ternary (printf "%s/vllm" (trimSuffix "/" .root.Values.nodeCache.path)) "" (ne .root.Values.nodeCache.path "")) }}
{{- if not $path }}{{ fail (printf "pool %s: compile_cache.volume node needs compile_cache.host_path or nodeCache.path" .group.pool) }}{{ end }}
  hostPath: {path: {{ $path }}, type: DirectoryOrCreate}
{{- else if eq $c.volume "pvc" }}
  persistentVolumeClaim: {claimName: {{ $c.claimName }}}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end }}
