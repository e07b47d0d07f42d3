{{/* Who makes the certificates: cert-manager when enabled; else a given Secret (tls.secret,
webhook.tlsSecret) when set; else Outpost's own certificate manager (the webhook process, or
the small certs Deployment when the webhook is off). Each helper prints "true" or nothing. */}}

{{- define "outpost.certManager" -}}
{{- if index .Values "cert-manager" "enabled" }}true{{ end -}}
{{- end -}}

{{- define "outpost.managedRegistryCert" -}}
{{- if and .Values.httpsEnabled (not (index .Values "cert-manager" "enabled")) (not .Values.tls.secret) }}true{{ end -}}
{{- end -}}

{{- define "outpost.managedWebhookCert" -}}
{{- if and .Values.webhook.enabled (not (index .Values "cert-manager" "enabled")) (not .Values.webhook.tlsSecret) }}true{{ end -}}
{{- end -}}

{{- define "outpost.managedCerts" -}}
{{- if or (include "outpost.managedRegistryCert" .) (include "outpost.managedWebhookCert" .) }}true{{ end -}}
{{- end -}}

{{/* The Secrets the manager keeps (names), as a list. */}}
{{- define "outpost.managedSecrets" -}}
{{- $fullname := include "outpost.fullname" . -}}
{{- $names := list (printf "%s-ca" $fullname) -}}
{{- if include "outpost.managedRegistryCert" . }}{{ $names = append $names (include "outpost.tlsSecret" .) }}{{ end -}}
{{- if include "outpost.managedWebhookCert" . }}{{ $names = append $names (printf "%s-webhook-tls" $fullname) }}{{ end -}}
{{- toJson $names -}}
{{- end -}}

{{- define "outpost.tlsChecks" -}}
{{- if and .Values.webhook.enabled (not (index .Values "cert-manager" "enabled")) .Values.webhook.tlsSecret (not .Values.webhook.caBundle) -}}
{{- fail "webhook.tlsSecret needs webhook.caBundle (the PEM CA bundle, base64, the API server verifies it with)" -}}
{{- end -}}
{{- end -}}
