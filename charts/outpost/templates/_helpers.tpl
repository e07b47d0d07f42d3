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

{{/*
The parent's registry, from the connection string's two non-secret fields
(ParentGatewayEndpoint, ParentEndpointProtocol) or from parent.gatewayEndpoint / parent.protocol
(which win; with existingSecret they are the only source): JSON
{"gateway": host[:port], "loginServer": host[:port], "plainHttp": bool}, or {} when unknown.
The login server is derived as the registry derives it: an ACR data endpoint
<registry>.<region>.data.azurecr.<tld> is served as <registry>.azurecr.<tld>.
*/}}
{{- define "outpost.parent" -}}
{{- $endpoint := "" -}}
{{- $protocol := "" -}}
{{- range splitList ";" (.Values.connectionString | default "") -}}
{{- $kv := splitn "=" 2 . -}}
{{- $key := $kv._0 | trim | lower -}}
{{- if eq $key "parentgatewayendpoint" -}}{{- $endpoint = $kv._1 | default "" | trim -}}{{- end -}}
{{- if eq $key "parentendpointprotocol" -}}{{- $protocol = $kv._1 | default "" | trim -}}{{- end -}}
{{- end -}}
{{- with .Values.parent.gatewayEndpoint -}}{{- $endpoint = . -}}{{- end -}}
{{- with .Values.parent.protocol -}}{{- $protocol = . -}}{{- end -}}
{{- $endpoint = lower $endpoint -}}
{{- if $endpoint -}}
{{- $labels := splitList "." $endpoint -}}
{{- $n := len $labels -}}
{{- $login := $endpoint -}}
{{- if and (ge $n 5) (eq (index $labels (sub $n 3)) "data") (eq (index $labels (sub $n 2)) "azurecr") -}}
{{- $login = printf "%s.azurecr.%s" (join "." (slice $labels 0 (sub $n 4))) (last $labels) -}}
{{- end -}}
{{- dict "gateway" $endpoint "loginServer" $login "plainHttp" (eq (lower $protocol) "http") | toJson -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{/*
The rules: webhook.rules, or by default the parent's login server and gateway host (over plain
HTTP when the parent speaks it), for the repositories kept in sync (all when none are listed).
*/}}
{{- define "outpost.rules" -}}
{{- $rules := .Values.webhook.rules | default (list) -}}
{{- if not $rules -}}
{{- $parent := include "outpost.parent" . | fromJson -}}
{{- with $parent.loginServer -}}
{{- $rules = append $rules (dict "upstream" . "plainHttp" $parent.plainHttp "repositories" $.Values.repositories) -}}
{{- end -}}
{{- if and $parent.gateway (ne $parent.gateway $parent.loginServer) -}}
{{- $rules = append $rules (dict "upstream" $parent.gateway "plainHttp" $parent.plainHttp "repositories" .Values.repositories) -}}
{{- end -}}
{{- end -}}
{{- toJson $rules -}}
{{- end -}}

{{/* The mirror config the webhook and the node agent share. Nothing secret goes in it. */}}
{{- define "outpost.mirrorConfig" -}}
registry = {{ include "outpost.registryHost" . | quote }}
{{- if not .Values.httpsEnabled }}
registry_plain_http = true
{{- end }}
{{- if .withSecret }}
pull_secret = {{ .Values.pullSecret.name | quote }}
skip_node_selector = {{ .Values.trustDistribution.skipNodeSelector | or (not .Values.trustDistribution.enabled) }}
check_availability = {{ .Values.webhook.checkAvailability }}
{{- end }}
{{- range include "outpost.rules" . | fromJsonArray }}

[[rule]]
upstream = {{ .upstream | quote }}
{{- if .repositories }}
repositories = [{{ range $i, $r := .repositories }}{{ if $i }}, {{ end }}{{ $r | quote }}{{ end }}]
{{- end }}
{{- if .plainHttp }}
plain_http = true
{{- end }}
{{- with .caFile }}
ca_file = {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Where the node agent finds the runtime's configuration on the node: the hostPath it mounts
(trustDistribution.hostConfigDir, by default the runtime's own directory) and, inside it, the
files it writes and checks. JSON {"runtime", "dir", "hostsDir", "containerdConfig",
"registriesYaml"}; paths are the node's.
*/}}
{{- define "outpost.nodeLayout" -}}
{{- $rt := .Values.trustDistribution.runtime -}}
{{- $defaults := dict "containerd" "/etc/containerd" "k3s" "/etc/rancher/k3s" "rke2" "/etc/rancher/rke2" "microk8s" "/var/snap/microk8s" "k0s" "/etc/k0s" -}}
{{- $dir := .Values.trustDistribution.hostConfigDir | default (get $defaults $rt) | trimSuffix "/" -}}
{{- $out := dict "dir" $dir "runtime" "containerd" "hostsDir" (printf "%s/certs.d" $dir) "containerdConfig" (printf "%s/config.toml" $dir) "registriesYaml" "" -}}
{{- if or (eq $rt "k3s") (eq $rt "rke2") -}}
{{- $_ := set $out "runtime" $rt -}}
{{- $_ := set $out "registriesYaml" (printf "%s/registries.yaml" $dir) -}}
{{- $_ := set $out "hostsDir" "" -}}
{{- $_ := set $out "containerdConfig" "" -}}
{{- else if eq $rt "microk8s" -}}
{{- $_ := set $out "hostsDir" (printf "%s/current/args/certs.d" $dir) -}}
{{- $_ := set $out "containerdConfig" (printf "%s/current/args/containerd.toml" $dir) -}}
{{- else if eq $rt "k0s" -}}
{{- $_ := set $out "hostsDir" (printf "%s/certs.d" $dir) -}}
{{- $_ := set $out "containerdConfig" (printf "%s/containerd.toml" $dir) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
--storage: the PVC's mount point, or s3://BUCKET[/PREFIX] / azblob://CONTAINER[/PREFIX].
*/}}
{{- define "outpost.storageUrl" -}}
{{- $s := .Values.storage -}}
{{- if eq $s.type "s3" -}}
{{- $prefix := trimAll "/" $s.s3.prefix -}}
s3://{{ $s.s3.bucket }}{{ with $prefix }}/{{ . }}{{ end }}
{{- else if eq $s.type "azblob" -}}
{{- $prefix := trimAll "/" $s.azblob.prefix -}}
azblob://{{ $s.azblob.container }}{{ with $prefix }}/{{ . }}{{ end }}
{{- else -}}
/var/lib/outpost
{{- end -}}
{{- end -}}

{{/*
The object store's environment, in object_store's own variable names: credentials by reference
to storage.existingSecret (each variable from the key of its own name unless storage.secretKeys
maps it; a default key the Secret lacks is skipped, a mapped one must exist), then the
non-secret settings. Only for storage.type s3 or azblob.
*/}}
{{- define "outpost.storageEnv" -}}
{{- $s := .Values.storage -}}
{{- $credentials := list "AZURE_STORAGE_ACCOUNT_KEY" "AZURE_STORAGE_SAS_KEY" "AZURE_STORAGE_CLIENT_SECRET" -}}
{{- $settings := dict -}}
{{- if eq $s.type "s3" -}}
{{- $credentials = list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" "AWS_SESSION_TOKEN" -}}
{{- with $s.s3.region }}{{ $_ := set $settings "AWS_REGION" . }}{{ end -}}
{{- with $s.s3.endpoint }}{{ $_ := set $settings "AWS_ENDPOINT" . }}{{ end -}}
{{- if $s.s3.virtualHostedStyleRequest }}{{ $_ := set $settings "AWS_VIRTUAL_HOSTED_STYLE_REQUEST" "true" }}{{ end -}}
{{- if $s.s3.allowHttp }}{{ $_ := set $settings "AWS_ALLOW_HTTP" "true" }}{{ end -}}
{{- else -}}
{{- with $s.azblob.account }}{{ $_ := set $settings "AZURE_STORAGE_ACCOUNT_NAME" . }}{{ end -}}
{{- if $s.azblob.useEmulator -}}
{{- $_ := set $settings "AZURE_STORAGE_USE_EMULATOR" "true" -}}
{{- with $s.azblob.endpoint }}{{ $_ := set $settings "AZURITE_BLOB_STORAGE_URL" . }}{{ end -}}
{{- else -}}
{{- with $s.azblob.endpoint }}{{ $_ := set $settings "AZURE_STORAGE_ENDPOINT" . }}{{ end -}}
{{- end -}}
{{- end -}}
{{- $keys := $s.secretKeys | default dict -}}
{{- with $s.existingSecret }}
{{- range $credentials }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.existingSecret | quote }}
      key: {{ get $keys . | default . | quote }}
      optional: {{ not (hasKey $keys .) }}
{{- end }}
{{- end }}
{{- range $name, $value := $settings }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "outpost.checks" -}}
{{- include "outpost.tlsChecks" . -}}
{{- include "outpost.registryChecks" . -}}
{{- include "outpost.nodeChecks" . -}}
{{- end -}}

{{/* The Secret holding the nodes' mirror-path credential, kept by the webhook when the node
     agent and the webhook both run, else "". */}}
{{- define "outpost.nodeCredentialSecret" -}}
{{- if and .Values.trustDistribution.enabled .Values.webhook.enabled -}}
{{- printf "%s-node-pull" (include "outpost.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "outpost.nodeChecks" -}}
{{- $t := .Values.trustDistribution -}}
{{- if and $t.nodeScope $t.nodeCredentials -}}
{{- fail "trustDistribution.nodeScope and trustDistribution.nodeCredentials exclude each other: the nodes pull with one credential" -}}
{{- end -}}
{{- if and $t.nodeScope (not .Values.webhook.enabled) -}}
{{- fail "trustDistribution.nodeScope needs webhook.enabled: the webhook mints the node credential" -}}
{{- end -}}
{{- end -}}

{{/* The registry's leader Lease (object storage, registry.leaderElection kubernetes), else "". */}}
{{- define "outpost.leaderLease" -}}
{{- if and (ne .Values.storage.type "pvc") (eq .Values.registry.leaderElection "kubernetes") -}}
{{- printf "%s-registry-leader" (include "outpost.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* What the schema refuses, refused again for installs that skip it (--skip-schema-validation). */}}
{{- define "outpost.registryChecks" -}}
{{- if and (gt (int .Values.registry.replicas) 1) (eq .Values.storage.type "pvc") -}}
{{- fail "registry.replicas > 1 needs object storage (storage.type s3 or azblob): a PersistentVolume is mounted by one pod, and the filesystem store allows one writer" -}}
{{- end -}}
{{- if not (has .Values.registry.leaderElection (list "kubernetes" "store")) -}}
{{- fail "registry.leaderElection must be kubernetes (a Lease) or store (a lease in the bucket)" -}}
{{- end -}}
{{- range .Values.sync.platforms -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?$" (toString .)) -}}
{{- fail (printf "sync.platforms: %q is not OS/ARCH[/VARIANT] (e.g. linux/amd64, linux/arm/v7)" (toString .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
