{{/*
Resource name prefix: fullnameOverride, else the release name.
*/}}
{{- define "voxgate.prefix" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "voxgate.gatewayName" -}}
{{- printf "%s-gateway" (include "voxgate.prefix" .) -}}
{{- end -}}

{{/*
Name of a pool's ASR objects. Call with (dict "root" $ "pool" $name).
*/}}
{{- define "voxgate.asrName" -}}
{{- $name := printf "%s-asr-%s" (include "voxgate.prefix" .root) .pool -}}
{{- if gt (len $name) 63 -}}
{{- fail (printf "ASR resource name %q is longer than 63 characters: shorten the release name, fullnameOverride or the pool name" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "voxgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" -}}
{{- end -}}

{{/*
Labels. Call with (dict "root" $ "component" "gateway"|"asr" "pool" $name-or-"").
*/}}
{{- define "voxgate.selectorLabels" -}}
app.kubernetes.io/name: voxgate
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .pool }}
voxgate.io/pool: {{ .pool }}
{{- end }}
{{- end -}}

{{- define "voxgate.labels" -}}
{{ include "voxgate.selectorLabels" . }}
helm.sh/chart: {{ include "voxgate.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: voxgate
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Image reference. Call with (dict "root" $ "image" .Values.gateway.image).
*/}}
{{- define "voxgate.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/*
URL scheme of the ASR link.
*/}}
{{- define "voxgate.asrScheme" -}}
{{- if .Values.asr.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}

{{/*
In-cluster URL of a pool's Service. Call with (dict "root" $ "pool" $name).
*/}}
{{- define "voxgate.asrUrl" -}}
{{- printf "%s://%s:%v" (include "voxgate.asrScheme" .root) (include "voxgate.asrName" .) (int .root.Values.asr.service.port) -}}
{{- end -}}

{{/*
A pool's URL repeated gateway.asrConnectionsPerPool times (one HTTP/2 connection per
entry), comma-separated; with "prefix" set, each entry is "<prefix>=<url>" (ASR_POOLS).
Call with (dict "root" $ "pool" $name "prefix" "").
*/}}
{{- define "voxgate.asrUrlList" -}}
{{- $n := int (default 1 .root.Values.gateway.asrConnectionsPerPool) -}}
{{- if lt $n 1 -}}{{- fail "gateway.asrConnectionsPerPool must be at least 1" -}}{{- end -}}
{{- $url := include "voxgate.asrUrl" . -}}
{{- $entry := ternary (printf "%s=%s" .prefix $url) $url (ne .prefix "") -}}
{{- $out := list -}}
{{- range until $n -}}{{- $out = append $out $entry -}}{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/*
One TOML value: string, bool, number or a list of those. Whole floats are written as
integers (Helm reads every YAML number as a float).
*/}}
{{- define "voxgate.tomlValue" -}}
{{- if kindIs "string" . -}}
{{ . | quote }}
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else if kindIs "slice" . -}}
[{{ range $i, $x := . }}{{ if $i }}, {{ end }}{{ include "voxgate.tomlValue" $x }}{{ end }}]
{{- else if or (kindIs "float64" .) (kindIs "float32" .) -}}
{{- if eq (floor .) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) -}}
{{ . }}
{{- else -}}
{{- fail (printf "cannot write %v (%s) as a TOML value" . (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/*
[server] settings of a pool: asr.server, then the pool's own, then TLS files.
Call with (dict "root" $ "pool" $name "spec" $spec). Returns YAML (use fromYaml).
*/}}
{{- define "voxgate.asrServer" -}}
{{- $server := mergeOverwrite (deepCopy (default dict .root.Values.asr.server)) (deepCopy (default dict .spec.server)) -}}
{{- range $key := list "host" "port" "certfile" "keyfile" "client_ca_file" }}
{{- if hasKey $server $key }}
{{- fail (printf "asr server setting %q is set by the chart (host/port by the image entrypoint, certfile/keyfile by asr.tls)" $key) }}
{{- end }}
{{- end }}
{{- if .root.Values.asr.tls.enabled }}
{{- $_ := set $server "certfile" "/etc/voxgate/tls/tls.crt" }}
{{- $_ := set $server "keyfile" "/etc/voxgate/tls/tls.key" }}
{{- if .root.Values.asr.tls.requireClientCert }}
{{- $_ := set $server "client_ca_file" (printf "/etc/voxgate/ca/%s" .root.Values.asr.tls.caKey) }}
{{- end }}
{{- end }}
{{- toYaml $server -}}
{{- end -}}

{{/*
The asr.toml of one pool. Call with (dict "root" $ "pool" $name "spec" $spec).
*/}}
{{- define "voxgate.asrToml" -}}
{{- $server := include "voxgate.asrServer" . | fromYaml -}}
# Rendered by the voxgate Helm chart for pool {{ .pool | quote }} (asr/main.py reads it).
default = {{ .pool | quote }}

[server]
{{- range $key, $value := $server }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "voxgate.tomlValue" $value }}
{{- end }}
{{- end }}

[pools.{{ .pool }}]
{{- range $key, $value := (default dict .spec.model) }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "voxgate.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Checks run once per render.
*/}}
{{- define "voxgate.validate" -}}
{{- if not .Values.asr.pools -}}
{{- fail "asr.pools must define at least one pool" -}}
{{- end -}}
{{- if not (hasKey .Values.asr.pools .Values.asr.defaultPool) -}}
{{- fail (printf "asr.defaultPool %q is not a key of asr.pools" .Values.asr.defaultPool) -}}
{{- end -}}
{{- range $name, $spec := .Values.asr.pools -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "asr pool name %q must be a DNS label (lower-case letters, digits, '-')" $name) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "ASR_URLS" "ASR_POOLS" "VOXGATE_HOST" "VOXGATE_PORT" "VOXGATE_HTTP_PORT" "ARCHIVE_DIR" "AUTH_JWT_SECRET" "AUTH_JWT_KEYS_FILE" "AUTH_JWT_ISSUER" "AUTH_JWT_AUDIENCE" "AUTH_DISABLED" "RECORDS_URL_KEY" "TLS_CERT_FILE" "TLS_KEY_FILE" "ASR_TLS_CA_FILE" "ASR_TLS_CERT_FILE" "ASR_TLS_KEY_FILE" "ASR_TOKEN" -}}
{{- if hasKey $.Values.gateway.env $key -}}
{{- fail (printf "gateway.env.%s is set by the chart; remove it (see values.yaml)" $key) -}}
{{- end -}}
{{- end -}}
{{- $compress := "true" -}}
{{- if hasKey .Values.gateway.env "ENABLE_COMPRESS" -}}
{{- $compress = lower (toString (index .Values.gateway.env "ENABLE_COMPRESS")) -}}
{{- end -}}
{{- $base := toString (default "" (index .Values.gateway.env "PUBLIC_BASE")) -}}
{{- if and (not (has $compress (list "false" "0" "no" "off"))) (not $base) -}}
{{- fail "gateway.env.PUBLIC_BASE is required: the absolute URL clients use to reach this gateway's HTTP port (record_url is built on it), e.g. https://voice.example.com" -}}
{{- end -}}
{{- if and $base (not (regexMatch "^https?://[^/]+" $base)) -}}
{{- fail (printf "gateway.env.PUBLIC_BASE %q must be an absolute http(s) URL" $base) -}}
{{- end -}}
{{- $auth := .Values.gateway.auth -}}
{{- if not (or $auth.existingSecret $auth.keysSecret $auth.disabled) -}}
{{- fail "gateway.auth: set existingSecret (HS256) or keysSecret (a JSON Web Key Set), or disabled: true to run without authentication" -}}
{{- end -}}
{{- if and .Values.asr.tls.requireClientCert (not (and .Values.asr.tls.enabled .Values.asr.tls.caSecret .Values.asr.tls.clientSecret)) -}}
{{- fail "asr.tls.requireClientCert needs asr.tls.enabled, caSecret and clientSecret" -}}
{{- end -}}
{{- if and .Values.asr.tls.enabled (not .Values.asr.tls.secretName) -}}
{{- fail "asr.tls.enabled needs asr.tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- end -}}

{{/*
The ServiceAccount the pods run as.
*/}}
{{- define "voxgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "voxgate.prefix" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An ASR probe. With asr.tls.requireClientCert the service refuses TLS handshakes without
a client certificate, which kubelet's httpGet probes cannot present: the probe is then
a Python one-liner in the container that presents the gateway's client certificate.
Call with (dict "root" $ "path" "/readyz" "scheme" $scheme).
*/}}
{{- define "voxgate.asrProbe" -}}
{{- if .root.Values.asr.tls.requireClientCert -}}
exec:
  command:
    - python3
    - -c
    - "import ssl,urllib.request as u;c=ssl.create_default_context(cafile='/etc/voxgate/ca/{{ .root.Values.asr.tls.caKey }}');c.check_hostname=False;c.load_cert_chain('/etc/voxgate/probe-client/tls.crt','/etc/voxgate/probe-client/tls.key');u.urlopen('https://127.0.0.1:8090{{ .path }}',context=c,timeout=3)"
{{- else -}}
httpGet:
  path: {{ .path }}
  port: http
  scheme: {{ .scheme }}
{{- end -}}
{{- end -}}
