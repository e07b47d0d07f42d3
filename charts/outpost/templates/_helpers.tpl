{{/* Names, labels and the few values every template needs. */}}

{{- define "outpost.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "outpost.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "outpost.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "outpost.image" -}}
{{ printf "%s/outpost-%s:%s" .ctx.Values.image.repository .name .ctx.Values.image.tag }}
{{- end -}}

{{/* host[:port] the nodes pull from: the fixed ClusterIP, or the Service's DNS name. */}}
{{- define "outpost.registryHost" -}}
{{- $host := .Values.service.clusterIP | default (printf "%s-registry.%s.svc.cluster.local" (include "outpost.fullname" .) .Release.Namespace) -}}
{{- if contains ":" $host -}}{{- $host = printf "[%s]" $host -}}{{- end -}}
{{- $default := ternary 443 80 .Values.httpsEnabled -}}
{{- if eq (int .Values.service.port) (int $default) -}}{{ $host }}{{- else -}}{{ printf "%s:%d" $host (int .Values.service.port) }}{{- end -}}
{{- end -}}

{{- define "outpost.tlsSecret" -}}
{{- .Values.tls.secret | default (printf "%s-registry-tls" (include "outpost.fullname" .)) -}}
{{- end -}}

{{- define "outpost.connectionSecret" -}}
{{- .Values.existingSecret | default (printf "%s-connection" (include "outpost.fullname" .)) -}}
{{- end -}}

{{/* The mirror config the webhook and the node agent share. */}}
{{- define "outpost.mirrorConfig" -}}
registry = {{ include "outpost.registryHost" . | quote }}
{{- if .withSecret }}
pull_secret = {{ .Values.pullSecret.name | quote }}
skip_node_selector = {{ .Values.trustDistribution.skipNodeSelector | or (not .Values.trustDistribution.enabled) }}
check_availability = {{ .Values.webhook.checkAvailability }}
{{- end }}
{{- range .Values.webhook.rules }}

[[rule]]
upstream = {{ .upstream | quote }}
{{- if .repositories }}
repositories = [{{ range $i, $r := .repositories }}{{ if $i }}, {{ end }}{{ $r | quote }}{{ end }}]
{{- end }}
{{- end }}
{{- end -}}

{{- define "outpost.checks" -}}
{{- if and .Values.trustDistribution.enabled (not .Values.httpsEnabled) -}}
{{- fail "trustDistribution needs httpsEnabled=true (containerd is configured to trust the registry's CA); set trustDistribution.enabled=false for a plain-HTTP lab install" -}}
{{- end -}}
{{- include "outpost.tlsChecks" . -}}
{{- end -}}
