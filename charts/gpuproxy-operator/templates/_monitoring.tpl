{{/*
Whether to render one prometheus-operator object of the operator: call with
(list $ <enabled value> "<Kind>"). `auto` renders it when the cluster serves
monitoring.coreos.com/v1 <Kind> (helm install/upgrade ask the API server; `helm template` knows
only what --api-versions says), so a default install never fails on a cluster without
prometheus-operator; true renders it regardless, false never. Nothing without metrics.enabled.
*/}}
{{- define "gpuproxy-operator.monitoringObject" -}}
{{- $root := index . 0 -}}
{{- $enabled := toString (index . 1) -}}
{{- $kind := index . 2 -}}
{{- $served := or ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)) ($root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
{{- if and $root.Values.metrics.enabled (or (eq $enabled "true") (and (eq $enabled "auto") $served)) -}}
true
{{- end }}
{{- end }}
