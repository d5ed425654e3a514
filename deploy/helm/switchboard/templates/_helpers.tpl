{{/* Names, labels and the pieces every Switchboard pod shares. */}}

{{- define "switchboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* RELEASE-switchboard, or RELEASE when it already contains the chart name. */}}
{{- define "switchboard.fullname" -}}
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

{{/* The name of one component's objects: FULLNAME-COMPONENT. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "switchboard.componentName" -}}
{{- printf "%s-%s" (include "switchboard.fullname" .root | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "switchboard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchboard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The standard app.kubernetes.io labels of every object. */}}
{{- define "switchboard.labels" -}}
helm.sh/chart: {{ include "switchboard.chart" . }}
{{ include "switchboard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchboard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component's objects. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "switchboard.componentLabels" -}}
{{ include "switchboard.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Selector labels of one component's pods. */}}
{{- define "switchboard.componentSelector" -}}
{{ include "switchboard.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "switchboard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "switchboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchboard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* gRPC targets and URLs the services reach each other at (Service DNS names). */}}
{{- define "switchboard.target" -}}
{{- $values := index .root.Values .component -}}
{{- printf "%s:%v" (include "switchboard.componentName" .) $values.port }}
{{- end }}

{{- define "switchboard.redisSecretName" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecret }}
{{- else }}
{{- include "switchboard.componentName" (dict "root" . "component" "redis") }}
{{- end }}
{{- end }}

{{- define "switchboard.redisSecretKey" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecretKey }}
{{- else }}
{{- "redis-url" }}
{{- end }}
{{- end }}

{{- define "switchboard.tenantsSecretName" -}}
{{- if .Values.tenants.existingSecret }}
{{- .Values.tenants.existingSecret }}
{{- else }}
{{- include "switchboard.componentName" (dict "root" . "component" "tenants") }}
{{- end }}
{{- end }}

{{/* The gateway's grace period: the given one, or preStop + drain + server shutdown + margin. */}}
{{- define "switchboard.gatewayGracePeriod" -}}
{{- $g := .Values.gateway }}
{{- $needed := add .Values.preStopSleepSeconds $g.drainTimeoutSeconds 10 5 -}}
{{- if not $g.terminationGracePeriodSeconds }}
{{- $needed }}
{{- else if lt (int $g.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must be at least preStopSleepSeconds + drainTimeoutSeconds + 15 = %v, or 0 to derive it" $g.terminationGracePeriodSeconds $needed) }}
{{- else }}
{{- $g.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Environment of every service: log level, Redis, tenants, tracing. Call with (dict "root" $ "component" "gateway" "redis" true "tenants" true). */}}
{{- define "switchboard.commonEnv" -}}
{{- $root := .root -}}
- name: SWITCHBOARD_LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
{{- if .redis }}
- name: SWITCHBOARD_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "switchboard.redisSecretName" $root }}
      key: {{ include "switchboard.redisSecretKey" $root }}
- name: SWITCHBOARD_REDIS_CLUSTER
  value: {{ and (eq $root.Values.redis.mode "external") $root.Values.redis.external.cluster | quote }}
{{- end }}
{{- if .tenants }}
{{- if or $root.Values.tenants.existingSecret $root.Values.tenants.file }}
- name: SWITCHBOARD_TENANTS_FILE
  value: /etc/switchboard/tenants/tenants.yaml
{{- else }}
- name: SWITCHBOARD_TENANT_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "switchboard.tenantsSecretName" $root }}
      key: tenant-keys
{{- end }}
{{- end }}
{{- if $root.Values.otlp.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $root.Values.otlp.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "switchboard-%s" .component | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $root.Values.otlp.samplingRatio | quote }}
{{- with $root.Values.otlp.resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ . | quote }}
{{- end }}
{{- if $root.Values.otlp.headersSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.otlp.headersSecret }}
      key: OTEL_EXPORTER_OTLP_HEADERS
{{- end }}
{{- end }}
{{- range $name, $value := (index $root.Values .component).extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* The tenants file volume (when there is a file) and the writable /tmp. */}}
{{- define "switchboard.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if and .tenants (or .root.Values.tenants.existingSecret .root.Values.tenants.file) }}
- name: tenants
  secret:
    secretName: {{ include "switchboard.tenantsSecretName" .root }}
    items:
      - key: {{ ternary .root.Values.tenants.existingSecretKey "tenants.yaml" (not (empty .root.Values.tenants.existingSecret)) }}
        path: tenants.yaml
{{- end }}
{{- end }}

{{- define "switchboard.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and .tenants (or .root.Values.tenants.existingSecret .root.Values.tenants.file) }}
- name: tenants
  mountPath: /etc/switchboard/tenants
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod-level settings every Switchboard pod shares. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "switchboard.podSpecCommon" -}}
{{- $values := index .root.Values .component -}}
serviceAccountName: {{ include "switchboard.serviceAccountName" .root }}
automountServiceAccountToken: {{ .root.Values.serviceAccount.automountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range $values.topologySpreadConstraints }}
  - {{- toYaml (omit . "labelSelector") | nindent 4 }}
    labelSelector:
      matchLabels:
        {{- if .labelSelector }}
        {{- toYaml .labelSelector.matchLabels | nindent 8 }}
        {{- else }}
        {{- include "switchboard.componentSelector" $ | nindent 8 }}
        {{- end }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Pod template metadata: labels and annotations. */}}
{{- define "switchboard.podMetadata" -}}
{{- $values := index .root.Values .component -}}
labels:
  {{- include "switchboard.componentLabels" . | nindent 2 }}
  {{- with $values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  {{- /* A changed tenants file, Redis URL or upstream key restarts the pods. */}}
  checksum/secrets: {{ include (print .root.Template.BasePath "/secrets.yaml") .root | sha256sum }}
  {{- with $values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* A rolling update that keeps capacity: a new pod is ready before an old one goes. */}}
{{- define "switchboard.strategy" -}}
type: RollingUpdate
rollingUpdate:
  maxUnavailable: 0
  maxSurge: 1
{{- end }}

{{/* The gRPC probes of a backend: startup and readiness on grpc.health.v1. */}}
{{- define "switchboard.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 2
  failureThreshold: 30
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 2
{{- end }}

{{/* A PodDisruptionBudget for one component. */}}
{{- define "switchboard.pdb" -}}
{{- $values := index .root.Values .component -}}
{{- if $values.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "switchboard.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "switchboard.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "switchboard.componentSelector" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* A ClusterIP Service for a gRPC backend: its gRPC port and its metrics port. */}}
{{- define "switchboard.backendService" -}}
{{- $values := index .root.Values .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "switchboard.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "switchboard.componentLabels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "switchboard.componentSelector" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $values.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ $values.metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- end }}

{{/* A ServiceMonitor for one component; the job label names the service (the alerts expect "switchboard" in it). */}}
{{- define "switchboard.serviceMonitor" -}}
{{- if .root.Values.metrics.serviceMonitor.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "switchboard.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "switchboard.componentLabels" . | nindent 4 }}
    {{- with .root.Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "switchboard.componentSelector" . | nindent 6 }}
  namespaceSelector:
    matchNames: [{{ .root.Release.Namespace }}]
  endpoints:
    - port: {{ .port }}
      path: /metrics
      interval: {{ .root.Values.metrics.serviceMonitor.interval }}
      relabelings:
        - targetLabel: job
          replacement: {{ printf "switchboard-%s" .component }}
{{- end }}
{{- end }}

{{/* The container ports of a backend. */}}
{{- define "switchboard.backendPorts" -}}
{{- $values := index .root.Values .component -}}
- name: grpc
  containerPort: {{ $values.port }}
  protocol: TCP
- name: metrics
  containerPort: {{ $values.metricsPort }}
  protocol: TCP
{{- end }}
