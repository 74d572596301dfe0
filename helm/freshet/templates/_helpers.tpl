{{/*
Names, labels and shared pieces of the freshet chart.
*/}}

{{/* The chart name (nameOverride wins). */}}
{{- define "freshet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name: the resource name prefix. Component resources append "-coordinator",
"-worker", "-etcd", "-etcd-headless", so it is cut to 45 characters (StatefulSet names
must stay under 52 for their pods' controller-revision-hash label).
*/}}
{{- define "freshet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of a component's resources. Call with (dict "ctx" $ "component" "worker"). */}}
{{- define "freshet.componentName" -}}
{{- printf "%s-%s" (include "freshet.fullname" .ctx) .component -}}
{{- end -}}

{{/* Chart name and version for the helm.sh/chart label. */}}
{{- define "freshet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the life of a release. Call with (dict "ctx" $ "component" "worker"). */}}
{{- define "freshet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "freshet.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels of every resource. Call with (dict "ctx" $ "component" "worker"). */}}
{{- define "freshet.labels" -}}
helm.sh/chart: {{ include "freshet.chart" .ctx }}
{{ include "freshet.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: freshet
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The image reference: repository:tag, or repository@digest. */}}
{{- define "freshet.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount the pods run as. */}}
{{- define "freshet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "freshet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap holding freshet.toml. */}}
{{- define "freshet.configMapName" -}}
{{- printf "%s-config" (include "freshet.fullname" .) -}}
{{- end -}}

{{/* The bundled etcd's headless Service (peer and per-member DNS). */}}
{{- define "freshet.etcdHeadlessName" -}}
{{- printf "%s-headless" (include "freshet.componentName" (dict "ctx" . "component" "etcd")) -}}
{{- end -}}

{{/* The address of bundled etcd member $i: (dict "ctx" $ "i" 0). */}}
{{- define "freshet.etcdMemberHost" -}}
{{- $etcd := include "freshet.componentName" (dict "ctx" .ctx "component" "etcd") -}}
{{- printf "%s-%d.%s.%s.svc.%s" $etcd (int .i) (include "freshet.etcdHeadlessName" .ctx) .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}

{{/*
The etcd endpoints as a JSON list: every bundled member, or etcd.endpoints (required,
each an http:// or https:// URL).
*/}}
{{- define "freshet.etcdEndpoints" -}}
{{- $endpoints := list -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- range $i, $_ := until (int .Values.etcd.bundled.replicas) -}}
{{- $endpoints = append $endpoints (printf "%s://%s:2379" (include "freshet.scheme" $) (include "freshet.etcdMemberHost" (dict "ctx" $ "i" $i))) -}}
{{- end -}}
{{- else -}}
{{- if not .Values.etcd.endpoints -}}
{{- fail "etcd.endpoints is required: the external etcd endpoints, e.g. --set 'etcd.endpoints={http://etcd.etcd.svc:2379}', or set etcd.bundled.enabled=true to run etcd in this release" -}}
{{- end -}}
{{- if not (kindIs "slice" .Values.etcd.endpoints) -}}
{{- fail "etcd.endpoints must be a list of URLs, e.g. [\"http://etcd.etcd.svc:2379\"]" -}}
{{- end -}}
{{- range .Values.etcd.endpoints -}}
{{- if not (regexMatch "^https?://[^/]+" (toString .)) -}}
{{- fail (printf "etcd.endpoints: %q is not an http:// or https:// URL (e.g. http://etcd.etcd.svc:2379)" (toString .)) -}}
{{- end -}}
{{- if and $.Values.etcd.tls.existingSecret (not (hasPrefix "https://" (toString .))) -}}
{{- fail (printf "etcd.endpoints: %q is not https:// but etcd.tls.existingSecret is set: use https:// URLs for an etcd with TLS" (toString .)) -}}
{{- end -}}
{{- if and (hasPrefix "https://" (toString .)) (not $.Values.etcd.tls.existingSecret) -}}
{{- fail (printf "etcd.endpoints: %q is https:// but etcd.tls.existingSecret is not set: name the Secret with the etcd CA (ca.crt, and tls.crt/tls.key for client certificates)" (toString .)) -}}
{{- end -}}
{{- $endpoints = append $endpoints (toString .) -}}
{{- end -}}
{{- end -}}
{{- toJson $endpoints -}}
{{- end -}}

{{/*
The object_store options derived from storage.* plus storage.options, as a JSON object
of strings. Keys that look like credentials are refused: they belong in a Secret.
*/}}
{{- define "freshet.storageOptions" -}}
{{- $s := .Values.storage -}}
{{- $opts := dict -}}
{{- if eq $s.type "s3" -}}
{{- with $s.s3.region }}{{ $_ := set $opts "aws_region" (toString .) }}{{ end -}}
{{- with $s.s3.endpoint }}{{ $_ := set $opts "aws_endpoint" (toString .) }}{{ end -}}
{{- if or $s.s3.allowHttp (hasPrefix "http://" (toString (default "" $s.s3.endpoint))) -}}
{{- $_ := set $opts "aws_allow_http" "true" -}}
{{- end -}}
{{- if $s.s3.endpoint -}}
{{- $_ := set $opts "aws_virtual_hosted_style_request" (ternary "true" "false" (eq (toString $s.s3.virtualHostedStyle) "true")) -}}
{{- end -}}
{{- else if eq $s.type "gcs" -}}
{{- with $s.gcs.serviceAccountPath }}{{ $_ := set $opts "google_service_account" (toString .) }}{{ end -}}
{{- else if eq $s.type "azure" -}}
{{- with $s.azure.accountName }}{{ $_ := set $opts "azure_storage_account_name" (toString .) }}{{ end -}}
{{- else if eq $s.type "local" -}}
{{- if not $s.local.existingClaim -}}
{{- fail "storage.local.existingClaim is required with storage.type=local: a ReadWriteMany PersistentVolumeClaim shared by every coordinator and worker pod" -}}
{{- end -}}
{{- else -}}
{{- fail (printf "storage.type must be one of s3, gcs, azure, local (got %q)" (toString $s.type)) -}}
{{- end -}}
{{- range $k, $v := (default dict $s.options) -}}
{{- if and (regexMatch "(?i)(secret|password|passwd|token|credential|access_key|account_key|sas|private_key|session)" $k) (not (regexMatch "(?i)(_file|_path)$" $k)) -}}
{{- fail (printf "storage.options.%s looks like a credential: the ConfigMap is not a Secret. Put it in a Secret and name it in storage.existingSecret (as AWS_*/GOOGLE_*/AZURE_* variables), or use cloud identity through serviceAccount.annotations" $k) -}}
{{- end -}}
{{- $_ := set $opts $k (toString $v) -}}
{{- end -}}
{{- toJson $opts -}}
{{- end -}}

{{/* TOML `key = value` for an integer value; fails on anything else. (dict "k" key "v" value "path" "config.x.y") */}}
{{- define "freshet.toml.int" -}}
{{- if not (or (kindIs "float64" .v) (kindIs "int" .v) (kindIs "int64" .v) (kindIs "int32" .v) (kindIs "uint64" .v)) -}}
{{- fail (printf "%s must be an integer (got %v)" .path .v) -}}
{{- end -}}
{{- if and (kindIs "float64" .v) (ne (float64 (int64 .v)) .v) -}}
{{- fail (printf "%s must be an integer (got %v)" .path .v) -}}
{{- end -}}
{{- if lt (int64 .v) 0 -}}
{{- fail (printf "%s must not be negative (got %v)" .path .v) -}}
{{- end -}}
{{ .k }} = {{ int64 .v }}
{{- end -}}

{{/* TOML `key = true|false`; fails on anything but a boolean. */}}
{{- define "freshet.toml.bool" -}}
{{- if not (kindIs "bool" .v) -}}
{{- fail (printf "%s must be true or false (got %v)" .path .v) -}}
{{- end -}}
{{ .k }} = {{ .v }}
{{- end -}}

{{/* TOML `key = "string"`: a JSON string is a valid TOML basic string. */}}
{{- define "freshet.toml.string" -}}
{{ .k }} = {{ toString .v | toJson }}
{{- end -}}

{{/* TOML `key = ["a", "b"]` from a list of strings. */}}
{{- define "freshet.toml.strings" -}}
{{- $out := list -}}
{{- range (default list .v) }}{{ $out = append $out (toString .) }}{{ end -}}
{{ .k }} = {{ toJson $out }}
{{- end -}}

{{/* Pod-level affinity: the component's, else the global, else the anti-affinity preset. (dict "ctx" $ "component" "worker" "affinity" {} "preset" "soft") */}}
{{- define "freshet.affinity" -}}
{{- if .affinity -}}
{{ toYaml .affinity }}
{{- else if eq (toString .preset) "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "freshet.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 12 }}
{{- else if eq (toString .preset) "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "freshet.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 10 }}
{{- else if .preset -}}
{{- fail (printf "podAntiAffinityPreset of %s must be soft, hard or \"\" (got %q)" .component (toString .preset)) -}}
{{- end -}}
{{- end -}}

{{/* A PodDisruptionBudget's minAvailable or maxUnavailable. (the component's pdb values) */}}
{{- define "freshet.pdbBudget" -}}
{{- if not (kindIs "invalid" .minAvailable) -}}
minAvailable: {{ .minAvailable }}
{{- else -}}
maxUnavailable: {{ default 1 .maxUnavailable }}
{{- end -}}
{{- end -}}

{{/* Environment of coordinator and worker containers shared by both. */}}
{{- define "freshet.commonEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/* envFrom of coordinator and worker containers: the credentials Secret, then extras. */}}
{{- define "freshet.envFrom" -}}
{{- $list := list -}}
{{- with .Values.storage.existingSecret }}
{{- $list = append $list (dict "secretRef" (dict "name" .)) -}}
{{- end }}
{{- range .Values.extraEnvFrom }}{{ $list = append $list . }}{{ end -}}
{{- if $list -}}
envFrom:
  {{- toYaml $list | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* Volume mounts of coordinator and worker containers. */}}
{{- define "freshet.volumeMounts" -}}
- name: config
  mountPath: /etc/freshet
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if eq .Values.storage.type "local" }}
- name: data
  mountPath: {{ .Values.storage.local.mountPath }}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes of coordinator and worker pods: (dict "ctx" $ "component" "worker"). */}}
{{- define "freshet.volumes" -}}
{{- $ctx := .ctx -}}
{{ include "freshet.configVolume" . }}
- name: tmp
  emptyDir:
    {{- with $ctx.Values.tmpSizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- if eq $ctx.Values.storage.type "local" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ $ctx.Values.storage.local.existingClaim }}
{{- end }}
{{- with $ctx.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* An HTTP probe on a named port. (dict "p" probeValues "path" "/livez" "port" "http") */}}
{{- define "freshet.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
periodSeconds: {{ .p.periodSeconds }}
timeoutSeconds: {{ default 3 .p.timeoutSeconds }}
failureThreshold: {{ .p.failureThreshold }}
{{- end -}}
