{{/*
TLS, tokens, source credentials and table locations: the chart's secure defaults.
Everything secret reaches the pods as files of one projected volume at /etc/freshet
(never through the ConfigMap or the environment):

  /etc/freshet/freshet.toml                  the ConfigMap
  /etc/freshet/tls/{tls.crt,tls.key,ca.crt}  tls.existingSecret or the cert-manager Secret
  /etc/freshet/auth/tokens.toml              coordinators: the auth Secret
  /etc/freshet/etcd/{ca.crt,tls.crt,tls.key,password}   external etcd's TLS and password
  /etc/freshet/secrets/<name>/password       coordinators: source passwords
*/}}

{{/* Where the projected volume puts the files (freshet.toml's paths). */}}
{{- define "freshet.paths" -}}
{{- toJson (dict
  "tlsCert" "/etc/freshet/tls/tls.crt" "tlsKey" "/etc/freshet/tls/tls.key" "tlsCa" "/etc/freshet/tls/ca.crt"
  "tokens" "/etc/freshet/auth/tokens.toml"
  "etcdCa" "/etc/freshet/etcd/ca.crt" "etcdCert" "/etc/freshet/etcd/tls.crt" "etcdKey" "/etc/freshet/etcd/tls.key" "etcdPassword" "/etc/freshet/etcd/password"
  "secrets" "/etc/freshet/secrets") -}}
{{- end -}}

{{/*
The TLS Secret of a component (coordinator, worker, etcd), "" when TLS is off. Fails
when TLS is on and no material is given. Call with (dict "ctx" $ "component" "worker").
*/}}
{{- define "freshet.tls.secretName" -}}
{{- $t := .ctx.Values.tls -}}
{{- if $t.enabled -}}
{{- if and $t.existingSecret $t.certManager.enabled -}}
{{- fail "tls.existingSecret and tls.certManager.enabled are both set: choose one source of certificates" -}}
{{- else if $t.existingSecret -}}
{{- $t.existingSecret -}}
{{- else if $t.certManager.enabled -}}
{{- if not $t.certManager.issuerRef.name -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name: the cert-manager Issuer or ClusterIssuer (a CA issuer, so ca.crt is filled in) that signs the coordinator, worker and etcd certificates" -}}
{{- end -}}
{{- printf "%s-tls" (include "freshet.componentName" (dict "ctx" .ctx "component" .component)) -}}
{{- else -}}
{{- fail "tls.enabled=true (the default) needs certificates: set tls.existingSecret to a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt, or tls.certManager.enabled=true with tls.certManager.issuerRef.name=<issuer>. For development only, opt out with tls.enabled=false (plaintext gRPC)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name verified in workers' certificates. */}}
{{- define "freshet.tls.workerServerName" -}}
{{- default (include "freshet.componentName" (dict "ctx" . "component" "worker")) .Values.tls.workerServerName -}}
{{- end -}}

{{/* The scheme of gRPC URLs: https with TLS. */}}
{{- define "freshet.scheme" -}}
{{- ternary "https" "http" (eq (toString .Values.tls.enabled) "true") -}}
{{- end -}}

{{/* The Secret holding tokens.toml ("" when auth is off). */}}
{{- define "freshet.auth.secretName" -}}
{{- if .Values.auth.enabled -}}
{{- default (printf "%s-auth" (include "freshet.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{/*
Source credentials: every sources[].password and sourceSecrets[] entry as a JSON list of
{name, secretName, key, hosts}; fails on missing fields and duplicate names.
*/}}
{{- define "freshet.sourceSecrets" -}}
{{- $out := list -}}
{{- $seen := dict -}}
{{- range $i, $s := (default list .Values.sources) -}}
{{- $p := printf "sources[%d]" $i -}}
{{- $name := required (printf "%s.name is required" $p) $s.name | toString -}}
{{- if not (regexMatch "^[A-Za-z0-9_-]+$" $name) -}}
{{- fail (printf "%s.name %q: letters, digits, _ and - only (it names a file path and a [secrets.<name>] entry)" $p $name) -}}
{{- end -}}
{{- if $s.password -}}
{{- $secretName := required (printf "%s.password.secretName is required: the existing Secret holding the PostgreSQL password" $p) $s.password.secretName -}}
{{- $_ := set $seen $name true -}}
{{- $out = append $out (dict "name" $name "secretName" $secretName "key" (default "password" $s.password.key) "hosts" (default list $s.hosts)) -}}
{{- end -}}
{{- end -}}
{{- range $i, $s := (default list .Values.sourceSecrets) -}}
{{- $p := printf "sourceSecrets[%d]" $i -}}
{{- $name := required (printf "%s.name is required" $p) $s.name | toString -}}
{{- if not (regexMatch "^[A-Za-z0-9_-]+$" $name) -}}
{{- fail (printf "%s.name %q: letters, digits, _ and - only" $p $name) -}}
{{- end -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "%s.name %q is already the name of a source's password" $p $name) -}}
{{- end -}}
{{- $_ := set $seen $name true -}}
{{- $secretName := required (printf "%s.secretName is required: the existing Secret holding the password" $p) $s.secretName -}}
{{- $out = append $out (dict "name" $name "secretName" $secretName "key" (default "password" $s.key) "hosts" (default list $s.hosts)) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
storage.allowed_prefixes: storage.allowedPrefixes, else the buckets (scheme://host) of the
catalog, of config.tables and of the sources' tables; for file URIs and paths their
first directory; for local storage file://<mountPath>.
*/}}
{{- define "freshet.allowedPrefixes" -}}
{{- $given := default list .Values.storage.allowedPrefixes -}}
{{- if $given -}}
{{- $out := list -}}
{{- range $given }}{{ $out = append $out (toString .) }}{{ end -}}
{{- toJson $out -}}
{{- else -}}
{{- $uris := list (toString .Values.config.catalog.uri) -}}
{{- range (default list .Values.config.tables) }}{{ $uris = append $uris (toString .uri) }}{{ end -}}
{{- range (default list .Values.sources) }}{{ range (default list .tables) }}{{ $uris = append $uris (toString .uri) }}{{ end }}{{ end -}}
{{- $out := list -}}
{{- if eq .Values.storage.type "local" -}}
{{- $out = append $out (printf "file://%s" .Values.storage.local.mountPath) -}}
{{- end -}}
{{- range $uris -}}
{{- if hasPrefix "file://" . -}}
{{- with regexFind "^file:///[^/]+" . }}{{ $out = append $out . }}{{ end -}}
{{- else if hasPrefix "/" . -}}
{{- with regexFind "^/[^/]+" . }}{{ $out = append $out . }}{{ end -}}
{{- else -}}
{{- with regexFind "^[A-Za-z][A-Za-z0-9+.-]*://[^/]+" . }}{{ $out = append $out . }}{{ end -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $out) -}}
{{- end -}}
{{- end -}}

{{/*
The projected volume at /etc/freshet: freshet.toml plus the component's secret files.
Call with (dict "ctx" $ "component" "coordinator").
*/}}
{{- define "freshet.configVolume" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $sources := list (dict "configMap" (dict "name" (include "freshet.configMapName" $ctx) "items" (list (dict "key" "freshet.toml" "path" "freshet.toml")))) -}}
{{- with (include "freshet.tls.secretName" (dict "ctx" $ctx "component" .component)) -}}
{{- $sources = append $sources (dict "secret" (dict "name" . "items" (list (dict "key" "tls.crt" "path" "tls/tls.crt") (dict "key" "tls.key" "path" "tls/tls.key") (dict "key" "ca.crt" "path" "tls/ca.crt")))) -}}
{{- end -}}
{{- if not $v.etcd.bundled.enabled -}}
{{- with $v.etcd.tls.existingSecret -}}
{{- $items := list (dict "key" "ca.crt" "path" "etcd/ca.crt") -}}
{{- if $v.etcd.tls.clientCert -}}
{{- $items = concat $items (list (dict "key" "tls.crt" "path" "etcd/tls.crt") (dict "key" "tls.key" "path" "etcd/tls.key")) -}}
{{- end -}}
{{- $sources = append $sources (dict "secret" (dict "name" . "items" $items)) -}}
{{- end -}}
{{- with $v.etcd.auth.existingSecret -}}
{{- $sources = append $sources (dict "secret" (dict "name" . "items" (list (dict "key" (default "password" $v.etcd.auth.passwordKey) "path" "etcd/password")))) -}}
{{- end -}}
{{- end -}}
{{- if eq .component "coordinator" -}}
{{- with (include "freshet.auth.secretName" $ctx) -}}
{{- $sources = append $sources (dict "secret" (dict "name" . "items" (list (dict "key" "tokens.toml" "path" "auth/tokens.toml")))) -}}
{{- end -}}
{{- range (include "freshet.sourceSecrets" $ctx | fromJsonArray) -}}
{{- $sources = append $sources (dict "secret" (dict "name" .secretName "items" (list (dict "key" .key "path" (printf "secrets/%s/password" .name))))) -}}
{{- end -}}
{{- end -}}
- name: config
  projected:
    sources:
      {{- toYaml $sources | nindent 6 }}
{{- end -}}
