{{/* Names and labels. */}}
{{- define "via.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "via.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "via.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "via.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "via.selectorLabels" -}}
app.kubernetes.io/name: {{ include "via.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "via.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "via.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The labels the router discovers serving pods by: name, instance and component (the role). */}}
{{- define "via.roleSelector" -}}
{{ include "via.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{/* vllm-router's --selector form of a role's labels: key=value words. */}}
{{- define "via.roleSelectorArgs" -}}
{{- $labels := include "via.roleSelector" . | fromYaml -}}
{{- range $k := keys $labels | sortAlpha }}
- {{ printf "%s=%s" $k (get $labels $k) | quote }}
{{- end -}}
{{- end -}}

{{- define "via.image" -}}
{{ printf "%s:%s" .Values.image.repository (toString .Values.image.tag) | quote }}
{{- end -}}

{{- define "via.terminationGracePeriodSeconds" -}}
{{- $d := .Values.drain -}}
{{- if $d.terminationGracePeriodSeconds -}}
{{- $d.terminationGracePeriodSeconds -}}
{{- else -}}
{{- /* + the server's graceful shutdown (5 s), the engine's stop (30 s), its leftovers (10 s), 5 s */ -}}
{{- add $d.preStopSeconds $d.graceSeconds $d.timeoutSeconds 50 -}}
{{- end -}}
{{- end -}}

{{/* ENGINE_EXTRA_ARGS: the user's, then multi-node and disaggregation flags (a shell's words). LoRA is
     not here: it goes through the image's LoRA settings (via.loraSettings). */}}
{{- define "via.engineExtraArgs" -}}
{{- $v := .Values -}}
{{- $args := list -}}
{{- with $v.engine.extraArgs }}{{ $args = append $args . }}{{ end -}}
{{- if $v.multiNode.enabled -}}
{{- $args = append $args (printf "--pipeline-parallel-size %d --distributed-executor-backend ray" (int $v.multiNode.nodes)) -}}
{{- end -}}
{{- if $v.disaggregation.enabled -}}
{{- $kv := dict "kv_connector" $v.disaggregation.kvConnector "kv_role" "kv_both" -}}
{{- $args = append $args (printf "--kv-transfer-config '%s'" (toJson $kv)) -}}
{{- end -}}
{{- join " " $args -}}
{{- end -}}

{{/* LoRA: `lora.*` as the image's own settings (app/lora/config.py), so the launcher fetches, checks
     and turns them into engine flags exactly as with `docker run -e LORA_MODULES=...`. The image turns
     LoRA on when an adapter source is named or LORA_DYNAMIC is true; `lora.enabled` with neither
     would serve nothing, so it is refused here. */}}
{{- define "via.loraConfigPath" -}}/etc/vllm-inference-api/lora/lora.yaml{{- end -}}
{{- define "via.loraSettings" -}}
{{- $l := .Values.lora -}}
{{- $s := dict -}}
{{- if $l.enabled -}}
{{- if and $l.config $l.configFile -}}
{{- fail "lora: set config (a file on the volume) or configFile (its content), not both" -}}
{{- end -}}
{{- if not (or $l.modules $l.dir $l.config $l.configFile (eq (toString $l.runtimeUpdates) "true")) -}}
{{- fail "lora.enabled serves no adapter: name lora.modules, lora.dir, lora.config or lora.configFile, or set lora.runtimeUpdates: true to load adapters at run time" -}}
{{- end -}}
{{- if and $l.maxLoras $l.maxCpuLoras (lt (int $l.maxCpuLoras) (int $l.maxLoras)) -}}
{{- fail (printf "lora.maxCpuLoras (%d) must be at least lora.maxLoras (%d), as vLLM requires" (int $l.maxCpuLoras) (int $l.maxLoras)) -}}
{{- end -}}
{{- with $l.modules }}{{ $_ := set $s "LORA_MODULES" (toJson .) }}{{ end -}}
{{- with $l.dir }}{{ $_ := set $s "LORA_DIR" . }}{{ end -}}
{{- if $l.configFile }}{{ $_ := set $s "LORA_CONFIG" (include "via.loraConfigPath" .) }}{{ end -}}
{{- with $l.config }}{{ $_ := set $s "LORA_CONFIG" . }}{{ end -}}
{{- with $l.maxRank }}{{ $_ := set $s "MAX_LORA_RANK" (toString .) }}{{ end -}}
{{- with $l.maxLoras }}{{ $_ := set $s "MAX_LORAS" (toString .) }}{{ end -}}
{{- with $l.maxCpuLoras }}{{ $_ := set $s "MAX_CPU_LORAS" (toString .) }}{{ end -}}
{{- if not (kindIs "invalid" $l.runtimeUpdates) }}{{ $_ := set $s "LORA_DYNAMIC" (toString $l.runtimeUpdates) }}{{ end -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}

{{/* The image's settings as a map (values first, then `env`, which wins). */}}
{{- define "via.settings" -}}
{{- $v := .Values -}}
{{- $s := dict "MODEL_NAME" (required "model.name is required" $v.model.name) "ENGINE" $v.engine.name -}}
{{- with $v.model.servedName }}{{ $_ := set $s "SERVED_MODEL_NAME" . }}{{ end -}}
{{- with $v.model.revision }}{{ $_ := set $s "MODEL_REVISION" . }}{{ end -}}
{{- with $v.model.profile }}{{ $_ := set $s "MODEL_PROFILE" . }}{{ end -}}
{{- with $v.engine.maxModelLen }}{{ $_ := set $s "MAX_MODEL_LEN" (toString .) }}{{ end -}}
{{- with $v.engine.gpuMemoryUtilization }}{{ $_ := set $s "GPU_MEMORY_UTIL" (toString .) }}{{ end -}}
{{- if $v.engine.tensorParallelSize -}}
{{- $_ := set $s "TENSOR_PARALLEL_SIZE" (toString $v.engine.tensorParallelSize) -}}
{{- else if gt (int $v.gpu.count) 1 -}}
{{- $_ := set $s "TENSOR_PARALLEL_SIZE" (toString $v.gpu.count) -}}
{{- end -}}
{{- with $v.engine.maxNumSeqs }}{{ $_ := set $s "MAX_NUM_SEQS" (toString .) }}{{ end -}}
{{- with $v.engine.dtype }}{{ $_ := set $s "DTYPE" . }}{{ end -}}
{{- with $v.engine.quantization }}{{ $_ := set $s "QUANTIZATION" . }}{{ end -}}
{{- with (include "via.engineExtraArgs" .) }}{{ $_ := set $s "ENGINE_EXTRA_ARGS" . }}{{ end -}}
{{- range $k, $val := include "via.loraSettings" . | fromYaml }}{{ $_ := set $s $k $val }}{{ end -}}
{{- $_ := set $s "DRAIN_GRACE_SECONDS" (toString $v.drain.graceSeconds) -}}
{{- $_ := set $s "DRAIN_TIMEOUT" (toString $v.drain.timeoutSeconds) -}}
{{- $_ := set $s "PORT" (toString $v.service.port) -}}
{{- range $k, $val := $v.env }}{{ $_ := set $s $k (toString $val) }}{{ end -}}
{{- toYaml $s -}}
{{- end -}}

{{/* The replica container's env: settings, then keys from Secrets. `extra` adds role-specific ones. */}}
{{- define "via.env" -}}
{{- $settings := include "via.settings" .root | fromYaml -}}
{{- range $k := keys $settings | sortAlpha }}
- name: {{ $k }}
  value: {{ get $settings $k | quote }}
{{- end }}
{{- range $name, $ref := dict "HF_TOKEN" .root.Values.secrets.hfToken "API_KEY" .root.Values.secrets.apiKey "ADMIN_API_KEY" .root.Values.secrets.adminApiKey "METRICS_API_KEY" .root.Values.secrets.metricsApiKey }}
{{- if $ref.name }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The replica's pod spec (Deployment, StatefulSet, a disaggregation role, a LeaderWorkerSet leader).
     Arguments: root, role, extraEnv (list), command (list, optional), ports (extra list). */}}
{{- define "via.podSpec" -}}
{{- $v := .root.Values -}}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ include "via.terminationGracePeriodSeconds" .root }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
containers:
  - name: server
    image: {{ include "via.image" .root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    {{- with .command }}
    command:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    env:
      {{- include "via.env" (dict "root" .root "extra" .extraEnv) | trim | nindent 6 }}
    ports:
      - name: http
        containerPort: {{ $v.service.port }}
        protocol: TCP
      {{- with .ports }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    startupProbe:
      httpGet: {path: /ping, port: http}
      periodSeconds: {{ $v.probes.startup.periodSeconds }}
      failureThreshold: {{ $v.probes.startup.failureThreshold }}
      timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
    readinessProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: {{ $v.probes.readiness.periodSeconds }}
      failureThreshold: {{ $v.probes.readiness.failureThreshold }}
      successThreshold: {{ $v.probes.readiness.successThreshold }}
      timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
    {{- if $v.probes.liveness.enabled }}
    livenessProbe:
      httpGet: {path: /ping, port: http}
      periodSeconds: {{ $v.probes.liveness.periodSeconds }}
      failureThreshold: {{ $v.probes.liveness.failureThreshold }}
      timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
    {{- end }}
    lifecycle:
      preStop:
        sleep:
          seconds: {{ $v.drain.preStopSeconds }}
    resources:
      {{- $gpu := dict $v.gpu.resource (toString $v.gpu.count) }}
      {{- $limits := merge (dict) (default (dict) $v.resources.limits) $gpu }}
      limits:
        {{- toYaml $limits | nindent 8 }}
      {{- with $v.resources.requests }}
      requests:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    volumeMounts:
      - name: data
        mountPath: /data
      - name: shm
        mountPath: /dev/shm
      {{- if and $v.lora.enabled $v.lora.configFile }}
      - name: lora-config
        mountPath: {{ include "via.loraConfigPath" .root | dir }}
        readOnly: true
      {{- end }}
volumes:
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.shmSize }}
  {{- if and $v.lora.enabled $v.lora.configFile }}
  - name: lora-config
    configMap:
      name: {{ include "via.fullname" .root }}-lora-config
  {{- end }}
  {{- if eq $v.persistence.mode "none" }}
  - name: data
    emptyDir: {}
  {{- else if eq $v.persistence.mode "shared" }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ default (printf "%s-data" (include "via.fullname" .root)) $v.persistence.existingClaim }}
  {{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod metadata of a serving role. */}}
{{- define "via.podMetadata" -}}
labels:
  {{- include "via.labels" .root | trim | nindent 2 }}
  app.kubernetes.io/component: {{ .role }}
  vllm-inference-api/serving: "true"
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $annotations := deepCopy (default (dict) .root.Values.podAnnotations) -}}
{{- if and .root.Values.lora.enabled .root.Values.lora.configFile }}
{{- /* LORA_CONFIG is read at start: a changed file rolls the replicas. */ -}}
{{- $_ := set $annotations "checksum/lora-config" (toYaml .root.Values.lora.configFile | sha256sum) }}
{{- end }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
