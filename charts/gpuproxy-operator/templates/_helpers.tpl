{{/*
Names and labels shared by every template.
*/}}

{{/* Chart name, overridable with nameOverride; 63 characters is the DNS label limit. */}}
{{- define "gpuproxy-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: `<release>-<chart>`, or just the release name when it already contains the chart name.
*/}}
{{- define "gpuproxy-operator.fullname" -}}
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

{{/* Chart label value: name-version, with + (not allowed in labels) replaced. */}}
{{- define "gpuproxy-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: never change them, Deployment selectors are immutable. */}}
{{- define "gpuproxy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpuproxy-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object of the release, without the component. */}}
{{- define "gpuproxy-operator.releaseLabels" -}}
helm.sh/chart: {{ include "gpuproxy-operator.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpuproxy
{{- end }}

{{/* Recommended labels on the operator's own objects. */}}
{{- define "gpuproxy-operator.labels" -}}
{{ include "gpuproxy-operator.releaseLabels" . }}
app.kubernetes.io/name: {{ include "gpuproxy-operator.name" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Whether to render the GpuProxyCluster. On the very first install the CRD is created by this same
release, and Helm cannot map a kind the cluster does not know yet, so the resource is skipped until
the API exists (NOTES.txt says to run `helm upgrade` once). With crds.install false the CRD is
installed separately and the resource is always rendered.
*/}}
{{- define "gpuproxy-operator.renderCluster" -}}
{{- if and .Values.cluster.create (or (not .Values.crds.install) (.Capabilities.APIVersions.Has "gpuproxy.aiserve.farm/v1alpha1/GpuProxyCluster")) -}}
true
{{- end }}
{{- end }}

{{/* Name of the ServiceAccount the operator runs as. */}}
{{- define "gpuproxy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpuproxy-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Operator image: repository@digest when a digest is set, else repository:tag (appVersion). */}}
{{- define "gpuproxy-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Namespaces the operator watches in a namespaced install (release namespace when none are given),
as a JSON list so templates can range over `fromJsonArray`.
*/}}
{{- define "gpuproxy-operator.watchNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- .Values.watch.namespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: repository@digest when a digest is set,
else repository:tag (the second argument when the tag is empty). */}}
{{- define "gpuproxy-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default (index . 1) $image.tag) }}
{{- end }}
{{- end }}

{{/* The operator pods' selector labels as key=value,... (GPUPROXY_OPERATOR_POD_LABELS): the
proxy NetworkPolicy admits them on the admin port (/stats for the autoscaler). */}}
{{- define "gpuproxy-operator.podLabelList" -}}
{{- $pairs := list }}
{{- range $key, $value := include "gpuproxy-operator.selectorLabels" . | fromYaml }}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
