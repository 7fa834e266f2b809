{{/* Chart name. */}}
{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified release name, short enough for the suffixes below. */}}
{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shoal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shoal
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "node"). */}}
{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shoal.componentLabels" -}}
{{ include "shoal.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shoal.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shoal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "shoal.pskSecretName" -}}
{{- default (printf "%s-psk" (include "shoal.fullname" .)) .Values.psk.existingSecret -}}
{{- end -}}

{{- define "shoal.tokenSecretName" -}}
{{- default (printf "%s-cache-token" (include "shoal.fullname" .)) .Values.cache.clientToken.existingSecret -}}
{{- end -}}

{{/* Whether any upstream credentials are configured. */}}
{{- define "shoal.hasCredentials" -}}
{{- $c := .Values.credentials -}}
{{- if kindIs "string" $c -}}
{{- if $c }}true{{ end -}}
{{- else if kindIs "map" $c -}}
{{- if or $c.existingSecret $c.dockerconfigjson $c.registries }}true{{ end -}}
{{- end -}}
{{- end -}}

{{- define "shoal.credentialsSecretName" -}}
{{- $c := .Values.credentials -}}
{{- if and (kindIs "map" $c) $c.existingSecret -}}
{{- $c.existingSecret -}}
{{- else -}}
{{- printf "%s-credentials" (include "shoal.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The docker config.json the chart stores, from a string or from registries. */}}
{{- define "shoal.dockerconfigjson" -}}
{{- $c := .Values.credentials -}}
{{- if kindIs "string" $c -}}
{{- $c -}}
{{- else if $c.dockerconfigjson -}}
{{- $c.dockerconfigjson -}}
{{- else -}}
{{- $auths := dict -}}
{{- range $host, $r := $c.registries -}}
{{- $_ := set $auths $host (dict "auth" (printf "%s:%s" $r.username $r.password | b64enc)) -}}
{{- end -}}
{{- dict "auths" $auths | toJson -}}
{{- end -}}
{{- end -}}

{{/* Redis: "builtin", "external" or "". */}}
{{- define "shoal.redisMode" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret -}}external
{{- else if .Values.redis.enabled -}}builtin
{{- end -}}
{{- end -}}

{{- define "shoal.redisSecretName" -}}
{{- default (printf "%s-redis" (include "shoal.fullname" .)) .Values.redis.existingSecret -}}
{{- end -}}

{{- define "shoal.cacheURL" -}}
http://{{ include "shoal.fullname" . }}-cache.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.cache.port }}
{{- end -}}

{{- define "shoal.bootstrapService" -}}
{{ include "shoal.fullname" . }}-node-bootstrap.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.node.routerPort }}
{{- end -}}

{{/* ServiceMonitor: explicit true/false, or auto when the CRD is served. */}}
{{- define "shoal.serviceMonitor" -}}
{{- $e := .Values.metrics.serviceMonitor.enabled -}}
{{- if kindIs "bool" $e -}}
{{- if $e }}true{{ end -}}
{{- else if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" -}}true
{{- end -}}
{{- end -}}

{{/* Checks that cannot be expressed in values.schema.json. */}}
{{- define "shoal.validate" -}}
{{- if and .Values.cache.enabled (gt (int .Values.cache.replicas) 1) -}}
{{- if not (include "shoal.redisMode" .) -}}
{{- fail "cache.replicas > 1 needs Redis for flight leases and the shared budget: set redis.enabled=true or redis.url (or redis.existingSecret)" -}}
{{- end -}}
{{- if and (eq .Values.cache.storage.driver "filesystem") .Values.cache.persistence.enabled (not .Values.cache.persistence.existingClaim) (not (has "ReadWriteMany" .Values.cache.persistence.accessModes)) -}}
{{- fail "cache.replicas > 1 on filesystem storage needs a shared volume: set cache.persistence.accessModes=[ReadWriteMany], an existingClaim, or object storage (cache.storage.driver=s3|gcs|azure)" -}}
{{- end -}}
{{- if eq .Values.cache.storage.driver "inmemory" -}}
{{- fail "cache.replicas > 1 cannot share inmemory storage: use object storage or a ReadWriteMany volume" -}}
{{- end -}}
{{- if and (eq .Values.cache.storage.driver "filesystem") (not .Values.cache.persistence.enabled) -}}
{{- fail "cache.replicas > 1 on filesystem storage needs cache.persistence.enabled (a shared ReadWriteMany volume)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.redis.enabled (or .Values.redis.url .Values.redis.existingSecret) -}}
{{- fail "set either redis.enabled (built-in Redis) or redis.url/redis.existingSecret (external), not both" -}}
{{- end -}}
{{- if and (kindIs "map" .Values.credentials) .Values.credentials.existingSecret (or .Values.credentials.dockerconfigjson .Values.credentials.registries) -}}
{{- fail "set either credentials.existingSecret or credentials.dockerconfigjson/registries, not both" -}}
{{- end -}}
{{- end -}}

{{/* Whole seconds of a Go duration such as 30s, 2m or 1m30s (h, m, s only). */}}
{{- define "shoal.seconds" -}}
{{- $d := toString . -}}
{{- $total := 0 -}}
{{- range $part := regexFindAll "[0-9]+[hms]" $d -1 -}}
{{- $v := int (trimSuffix "h" (trimSuffix "m" (trimSuffix "s" $part))) -}}
{{- if hasSuffix "h" $part }}{{ $total = add $total (mul $v 3600) }}{{ else if hasSuffix "m" $part }}{{ $total = add $total (mul $v 60) }}{{ else }}{{ $total = add $total $v }}{{ end -}}
{{- end -}}
{{- $total -}}
{{- end -}}
