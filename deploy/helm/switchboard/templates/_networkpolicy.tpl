{{/* NetworkPolicy pieces. Peers are NetworkPolicy peers (podSelector, namespaceSelector, ipBlock). */}}

{{/* The pods of one component, as a peer list. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "switchboard.np.pods" -}}
- podSelector:
    matchLabels:
      {{- include "switchboard.componentSelector" . | nindent 6 }}
{{- end }}

{{/* Addresses outside the private ranges and the cloud metadata service. */}}
{{- define "switchboard.np.internet" -}}
- ipBlock:
    cidr: 0.0.0.0/0
    except: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, 100.64.0.0/10]
{{- end }}

{{/* An egress or ingress rule: "to"/"from" the peers (all when empty) on the ports. Call with (dict "key" "to" "peers" LIST "ports" LIST). */}}
{{- define "switchboard.np.rule" -}}
{{- $ports := list -}}
{{- range .ports }}
{{- $ports = append $ports (dict "port" . "protocol" "TCP") }}
{{- end }}
{{- $rule := dict "ports" $ports }}
{{- if .peers }}
{{- $_ := set $rule .key .peers }}
{{- end }}
{{- list $rule | toYaml }}
{{- end }}

{{/* Egress every service needs: DNS, and Redis and the OTLP collector when it uses them. Call with (dict "root" $ "redis" bool). */}}
{{- define "switchboard.np.commonEgress" -}}
{{- $root := .root }}
{{- $np := $root.Values.networkPolicy -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- if .redis }}
{{- if eq $root.Values.redis.mode "bundled" }}
- to:
    {{- include "switchboard.np.pods" (dict "root" $root "component" "redis") | nindent 4 }}
  ports:
    - port: {{ $root.Values.redis.bundled.port }}
      protocol: TCP
{{- else }}
{{ include "switchboard.np.rule" (dict "key" "to" "peers" $np.redisTo "ports" $np.redisPorts) }}
{{- end }}
{{- end }}
{{- if $root.Values.otlp.endpoint }}
{{ include "switchboard.np.rule" (dict "key" "to" "peers" $np.otlpTo "ports" $np.otlpPorts) }}
{{- end }}
{{- end }}

{{/* The NetworkPolicy of a gRPC backend: gRPC from the gateways, /metrics from metricsFrom. Call with (dict "root" $ "component" "session" "redis" bool "egress" "<more egress rules YAML>"). */}}
{{- define "switchboard.np.backend" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- $ctx := dict "root" $root "component" .component -}}
{{- if $root.Values.networkPolicy.enabled }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "switchboard.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "switchboard.componentLabels" $ctx | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "switchboard.componentSelector" $ctx | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        {{- include "switchboard.np.pods" (dict "root" $root "component" "gateway") | nindent 8 }}
      ports:
        - port: {{ $values.port }}
          protocol: TCP
    {{- include "switchboard.np.rule" (dict "key" "from" "peers" (default (list (dict "namespaceSelector" (dict))) $root.Values.networkPolicy.metricsFrom) "ports" (list $values.metricsPort)) | nindent 4 }}
  egress:
    {{- include "switchboard.np.commonEgress" (dict "root" $root "redis" .redis) | nindent 4 }}
    {{- with .egress }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}
