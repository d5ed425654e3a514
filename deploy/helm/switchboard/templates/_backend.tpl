{{/*
The Deployment of a gRPC backend (session, broker, toolexec). Call with
(dict "root" $ "component" "session" "redis" true "tenants" false "env" "<more env YAML>"
      "liveness" "grpc|tcp" "envFrom" "<envFrom YAML>").
Backends drain on SIGTERM for 10 s (switchboard.rpc): the grace period covers the
preStop sleep, that drain and a margin.
*/}}
{{- define "switchboard.backendDeployment" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "switchboard.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "switchboard.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if not (and (hasKey $values "autoscaling") $values.autoscaling.enabled) }}
  replicas: {{ $values.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    {{- include "switchboard.strategy" $root | nindent 4 }}
  selector:
    matchLabels:
      {{- include "switchboard.componentSelector" $ctx | nindent 6 }}
  template:
    metadata:
      {{- include "switchboard.podMetadata" $ctx | nindent 6 }}
    spec:
      {{- include "switchboard.podSpecCommon" $ctx | nindent 6 }}
      terminationGracePeriodSeconds: {{ add $root.Values.preStopSleepSeconds 10 5 }}
      containers:
        - name: {{ .component }}
          image: {{ include "switchboard.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", {{ printf "switchboard.%s" .component | quote }}]
          ports:
            {{- include "switchboard.backendPorts" $ctx | nindent 12 }}
          env:
            - name: {{ printf "SWITCHBOARD_%s_LISTEN" (upper .component) }}
              value: {{ printf "0.0.0.0:%v" $values.port | quote }}
            - name: {{ printf "SWITCHBOARD_%s_METRICS_LISTEN" (upper .component) }}
              value: {{ printf "0.0.0.0:%v" $values.metricsPort | quote }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- include "switchboard.commonEnv" (dict "root" $root "component" .component "redis" .redis "tenants" .tenants) | nindent 12 }}
          {{- with .envFrom }}
          envFrom:
            {{- . | nindent 12 }}
          {{- end }}
          {{- include "switchboard.grpcProbes" $values | nindent 10 }}
          livenessProbe:
            {{- if eq .liveness "grpc" }}
            grpc:
              port: {{ $values.port }}
            {{- else }}
            # Not gRPC health: it turns NOT_SERVING while Redis is down, and a
            # restart would not bring Redis back.
            tcpSocket:
              port: grpc
            {{- end }}
            periodSeconds: 10
            timeoutSeconds: 3
            failureThreshold: 3
          lifecycle:
            # The gateways stop sending here while the endpoint goes away; SIGTERM follows.
            preStop:
              exec:
                command: ["sleep", {{ $root.Values.preStopSleepSeconds | quote }}]
          resources:
            {{- toYaml $values.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "switchboard.volumeMounts" (dict "root" $root "tenants" .tenants) | nindent 12 }}
      volumes:
        {{- include "switchboard.volumes" (dict "root" $root "tenants" .tenants) | nindent 8 }}
{{- end }}
