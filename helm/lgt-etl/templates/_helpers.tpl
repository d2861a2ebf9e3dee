{{/* vim: set filetype=mustache: */}}

{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "lgt-etl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed by the chart name unless it has it. */}}
{{- define "lgt-etl.fullname" -}}
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

{{- define "lgt-etl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. Argument: the root context. */}}
{{- define "lgt-etl.labels" -}}
helm.sh/chart: {{ include "lgt-etl.chart" . }}
app.kubernetes.io/name: {{ include "lgt-etl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lgt-etl
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels. Argument: (dict "root" $ "component" "name"). */}}
{{- define "lgt-etl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lgt-etl.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference. Argument: an image block {repository, tag}. */}}
{{- define "lgt-etl.imageRef" -}}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}

{{- define "lgt-etl.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Names of the chart's components. */}}
{{- define "lgt-etl.simName" -}}
{{- printf "%s-sim" (include "lgt-etl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lgt-etl.minioName" -}}
{{- printf "%s-minio" (include "lgt-etl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lgt-etl.lineageDbName" -}}
{{- printf "%s-lineage-db" (include "lgt-etl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Argument: (dict "root" $ "model" <vllm.models item>). */}}
{{- define "lgt-etl.vllmName" -}}
{{- printf "%s-vllm-%s" (include "lgt-etl.fullname" .root) .model.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The headless Service of a vllm.models item (the StatefulSet's serviceName): it gives each pod
its own DNS name, <pod>.<this>.<namespace>.svc.<clusterDomain>, so that the request engine can
address every replica. Argument: (dict "root" $ "model" <vllm.models item>).
*/}}
{{- define "lgt-etl.vllmHeadlessName" -}}
{{- printf "%s-headless" (include "lgt-etl.vllmName" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* Replicas of a vllm.models item (1 when unset). Argument: the item. */}}
{{- define "lgt-etl.vllmReplicas" -}}
{{- if hasKey . "replicas" }}{{ int .replicas }}{{ else }}1{{ end }}
{{- end }}

{{/*
Base URLs of a vllm.models item's pods, one per replica, comma-separated (the format of
LGT_<ROLE>_BASE_URL), through its headless Service. A pod that is not ready has no DNS record
(publishNotReadyAddresses: false): the engine counts it down and probes it back.
Argument: (dict "root" $ "model" <vllm.models item>).
*/}}
{{- define "lgt-etl.vllmReplicaUrls" -}}
{{- $name := include "lgt-etl.vllmName" . }}
{{- $svc := include "lgt-etl.vllmHeadlessName" . }}
{{- $v := .root.Values.vllm }}
{{- $ns := .root.Release.Namespace }}
{{- $urls := list }}
{{- range $i := until (include "lgt-etl.vllmReplicas" .model | int) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc.%s:%d/v1" $name $i $svc $ns ($v.clusterDomain | default "cluster.local") (int $v.service.port)) }}
{{- end }}
{{- join "," $urls }}
{{- end }}

{{/* Served model name of a vllm.models item. Argument: the item. */}}
{{- define "lgt-etl.vllmServedName" -}}
{{- default .model .servedModelName }}
{{- end }}

{{/*
The Secret with the AIRFLOW_CONN_LGT_* connections and the LGT_* env. Fixed pattern
"<release>-lgt-connections" because airflow.extraEnvFrom (templated by the Airflow chart, which
cannot call this chart's helpers) refers to it as '{{ .Release.Name }}-lgt-connections'.
*/}}
{{- define "lgt-etl.connectionsSecretName" -}}
{{- if .Values.connections.existingSecret }}
{{- .Values.connections.existingSecret }}
{{- else }}
{{- printf "%s-lgt-connections" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Checksum of the connections Secret, for a pod template annotation: pods restart when it
changes. The chart's own Secret is hashed as rendered; a Secret you manage
(connections.existingSecret) is read from the cluster at install/upgrade time (`lookup`; empty
under `helm template`). Argument: the root context.
*/}}
{{- define "lgt-etl.connectionsChecksum" -}}
{{- $live := "" }}
{{- if .Values.connections.existingSecret }}
{{- with lookup "v1" "Secret" .Release.Namespace .Values.connections.existingSecret }}
{{- $live = toJson .data }}
{{- end }}
{{- end }}
{{- printf "%s%s" (include (print .Template.BasePath "/connections-secret.yaml") .) $live | sha256sum | quote }}
{{- end }}

{{/*
Checksum of what a vLLM pod reads from the connections Secret: its role's API key (as
VLLM_API_KEY). Not the whole Secret, so that scaling one role (which rewrites the base URL
lists) does not restart the model servers of every role. Argument: (dict "root" $ "role" "vlm").
*/}}
{{- define "lgt-etl.vllmKeyChecksum" -}}
{{- $key := printf "LGT_%s_API_KEY" (upper .role) }}
{{- $value := "" }}
{{- if .root.Values.connections.existingSecret }}
{{- with lookup "v1" "Secret" .root.Release.Namespace .root.Values.connections.existingSecret }}
{{- $value = index (.data | default dict) $key | default "" }}
{{- end }}
{{- else }}
{{- $value = (index .root.Values.connections.endpoints .role).apiKey }}
{{- end }}
{{- printf "%s/%s=%s" (include "lgt-etl.connectionsSecretName" .root) $key $value | sha256sum | quote }}
{{- end }}

{{/*
The Secret (key "connection") with the Airflow metadata DB URL, named as the Airflow chart names
it: data.metadataSecretName if set; else "<release>-airflow-metadata", or, with the chart's
useStandardNaming, "<airflow fullname>-metadata" (fullname = fullnameOverride, or the release
name if it contains the chart name, else "<release>-airflow"). pools.metadataSecretName wins.
*/}}
{{- define "lgt-etl.airflowMetadataSecretName" -}}
{{- $af := .Values.airflow | default dict }}
{{- $fromData := dig "data" "metadataSecretName" "" $af }}
{{- if .Values.pools.metadataSecretName }}
{{- .Values.pools.metadataSecretName }}
{{- else if $fromData }}
{{- $fromData }}
{{- else if dig "useStandardNaming" false $af }}
{{- $afName := dig "nameOverride" "" $af | default "airflow" }}
{{- $afFull := "" }}
{{- if dig "fullnameOverride" "" $af }}
{{- $afFull = dig "fullnameOverride" "" $af | trunc 63 | trimSuffix "-" }}
{{- else if contains $afName .Release.Name }}
{{- $afFull = .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $afFull = printf "%s-%s" .Release.Name $afName | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- printf "%s-metadata" $afFull }}
{{- else }}
{{- printf "%s-airflow-metadata" .Release.Name }}
{{- end }}
{{- end }}

{{/* ---- lineage database ---- */}}
{{- define "lgt-etl.lineageDbHost" -}}
{{- if .Values.lineageDatabase.embedded.enabled }}
{{- include "lgt-etl.lineageDbName" . }}
{{- else }}
{{- required "lineageDatabase.host is required when lineageDatabase.embedded.enabled=false" .Values.lineageDatabase.host }}
{{- end }}
{{- end }}

{{/* SQLAlchemy URL (LGT_DATABASE_URL). Credentials are URL-encoded. */}}
{{- define "lgt-etl.lineageDbUrl" -}}
{{- $db := .Values.lineageDatabase }}
{{- $url := printf "postgresql+psycopg2://%s:%s@%s:%d/%s" ($db.user | urlquery) ($db.password | urlquery) (include "lgt-etl.lineageDbHost" .) (int $db.port) $db.database }}
{{- if and $db.sslmode (not $db.embedded.enabled) }}
{{- $url = printf "%s?sslmode=%s" $url $db.sslmode }}
{{- end }}
{{- $url }}
{{- end }}

{{/* ---- object store ---- */}}
{{/* S3 endpoint URL ("" = AWS default). */}}
{{- define "lgt-etl.s3EndpointUrl" -}}
{{- if .Values.objectStore.minio.enabled }}
{{- printf "http://%s:9000" (include "lgt-etl.minioName" .) }}
{{- else }}
{{- .Values.objectStore.external.endpointUrl }}
{{- end }}
{{- end }}

{{- define "lgt-etl.s3AccessKey" -}}
{{- if .Values.objectStore.minio.enabled }}
{{- .Values.objectStore.minio.rootUser }}
{{- else }}
{{- .Values.objectStore.external.accessKeyId }}
{{- end }}
{{- end }}

{{- define "lgt-etl.s3SecretKey" -}}
{{- if .Values.objectStore.minio.enabled }}
{{- .Values.objectStore.minio.rootPassword }}
{{- else }}
{{- .Values.objectStore.external.secretAccessKey }}
{{- end }}
{{- end }}

{{/* ---- model endpoints ---- */}}
{{/*
The enabled in-chart vLLM model serving a role, as JSON ("{}" if none).
Argument: (dict "root" $ "role" "vlm").
*/}}
{{- define "lgt-etl.vllmModelForRole" -}}
{{- $found := dict }}
{{- if .root.Values.vllm.enabled }}
{{- range .root.Values.vllm.models }}
{{- if and (ne (toString .enabled) "false") (eq .role $.role) }}
{{- $found = . }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $found }}
{{- end }}

{{/*
Base URL(s) (…/v1) for a role, comma-separated: the operator's baseUrl (one server, or a list
of replicas), else one URL per pod of the role's in-chart vLLM, else the simulator.
Argument: (dict "root" $ "role" "vlm").
*/}}
{{- define "lgt-etl.endpointBaseUrl" -}}
{{- $ep := index .root.Values.connections.endpoints .role }}
{{- $m := include "lgt-etl.vllmModelForRole" . | fromJson }}
{{- if $ep.baseUrl }}
{{- $ep.baseUrl }}
{{- else if $m.name }}
{{- include "lgt-etl.vllmReplicaUrls" (dict "root" .root "model" $m) }}
{{- else if .root.Values.simulator.enabled }}
{{- printf "http://%s:%d/v1" (include "lgt-etl.simName" .root) (int .root.Values.simulator.service.port) }}
{{- else }}
{{- fail (printf "no endpoint for role %q: set connections.endpoints.%s.baseUrl, enable a vllm model with role %q, or enable the simulator" .role .role .role) }}
{{- end }}
{{- end }}

{{/*
A role's base URLs as a JSON list (trimmed, no empty entries). Argument: (dict "root" $ "role" "vlm").
*/}}
{{- define "lgt-etl.endpointUrlList" -}}
{{- $urls := list }}
{{- range splitList "," (include "lgt-etl.endpointBaseUrl" .) }}
{{- with trim . }}
{{- $urls = append $urls . }}
{{- end }}
{{- end }}
{{- toJson $urls }}
{{- end }}

{{/*
A role's Airflow connection (JSON): one base URL as `host`; several as `extra.base_urls`, the
list form lgt_ops.airflow_adapter reads (it wins over `host`). Argument: (dict "root" $ "role" "vlm").
*/}}
{{- define "lgt-etl.endpointConnection" -}}
{{- $ep := index .root.Values.connections.endpoints .role }}
{{- $urls := include "lgt-etl.endpointUrlList" . | fromJsonArray }}
{{- $extra := dict "model" (include "lgt-etl.endpointModel" .) "max_inflight" (int $ep.maxInflight) }}
{{- $conn := dict "conn_type" "openai" "password" $ep.apiKey "extra" $extra }}
{{- if gt (len $urls) 1 }}
{{- $_ := set $extra "base_urls" $urls }}
{{- else if $urls }}
{{- $_ := set $conn "host" (first $urls) }}
{{- end }}
{{- toJson $conn }}
{{- end }}

{{/* Model name sent by the client for a role. Argument: (dict "root" $ "role" "vlm"). */}}
{{- define "lgt-etl.endpointModel" -}}
{{- $ep := index .root.Values.connections.endpoints .role }}
{{- $m := include "lgt-etl.vllmModelForRole" . | fromJson }}
{{- if and (not $ep.baseUrl) $m.name }}
{{- include "lgt-etl.vllmServedName" $m }}
{{- else }}
{{- $ep.model }}
{{- end }}
{{- end }}

{{/* Checks that cannot be expressed in values.schema.json. Renders nothing. */}}
{{- define "lgt-etl.validate" -}}
{{- $seen := dict }}
{{- $names := dict }}
{{- range .Values.vllm.models }}
{{- if hasKey $names .name }}
{{- fail (printf "vllm.models: duplicate name %q" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- if and $.Values.vllm.enabled (ne (toString .enabled) "false") }}
{{- if hasKey $seen .role }}
{{- fail (printf "vllm.models: two enabled models have role %q (%s, %s)" .role (get $seen .role) .name) }}
{{- end }}
{{- $_ := set $seen .role .name }}
{{- end }}
{{- end }}
{{- $pools := dict }}
{{- range .Values.pools.items }}
{{- if hasKey $pools .name }}
{{- fail (printf "pools.items: duplicate pool %q" .name) }}
{{- end }}
{{- $_ := set $pools .name true }}
{{- end }}
{{- end }}
