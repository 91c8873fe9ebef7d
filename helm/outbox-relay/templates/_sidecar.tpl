{{/*
Sidecar mode: templates an application's chart includes in its own pod spec.

The application's chart lists outbox-relay as a dependency, sets `outbox-relay.mode:
sidecar` (plus the database and providers) in its values, and writes in its pod spec:

  spec:
    terminationGracePeriodSeconds: {{ include "outbox-relay.sidecar.terminationGracePeriodSeconds" . }}
    initContainers:
      {{- include "outbox-relay.sidecar.initContainers" . | nindent 6 }}
    containers:
      - name: app
        ...
      {{- include "outbox-relay.sidecar.containers" . | nindent 6 }}
    volumes:
      {{- include "outbox-relay.sidecar.volumes" . | nindent 6 }}

and in the pod template's metadata.annotations:

      {{- include "outbox-relay.sidecar.podAnnotations" . | nindent 8 }}

`containers` renders the relay unless sidecar.native is true; `initContainers` renders it
(with restartPolicy: Always, a Kubernetes 1.29+ native sidecar) only when it is. Including
both keeps the application's chart the same for either setting. `outbox-relay.sidecar`
renders the container item by itself.

The argument is the application chart's root scope (`.` or `$`). When the dependency has an
alias, pass `(dict "root" $ "chart" "ALIAS")`. The templates read the dependency's own
scope (.Subcharts), so names, values and the image tag are those of the outbox-relay chart.
*/}}

{{- define "outbox-relay.sidecar" -}}
{{- include "outbox-relay.sidecarImpl.dispatch" (list . "item") -}}
{{- end -}}

{{- define "outbox-relay.sidecar.containers" -}}
{{- include "outbox-relay.sidecarImpl.dispatch" (list . "containers") -}}
{{- end -}}

{{- define "outbox-relay.sidecar.initContainers" -}}
{{- include "outbox-relay.sidecarImpl.dispatch" (list . "initContainers") -}}
{{- end -}}

{{- define "outbox-relay.sidecar.volumes" -}}
{{- include "outbox-relay.sidecarImpl.dispatch" (list . "volumes") -}}
{{- end -}}

{{- define "outbox-relay.sidecar.podAnnotations" -}}
{{- include "outbox-relay.sidecarImpl.dispatch" (list . "podAnnotations") -}}
{{- end -}}

{{- define "outbox-relay.sidecar.terminationGracePeriodSeconds" -}}
{{- include "outbox-relay.sidecarImpl.dispatch" (list . "terminationGracePeriodSeconds") -}}
{{- end -}}

{{/* Resolve the outbox-relay dependency's scope from the caller's root, then render. */}}
{{- define "outbox-relay.sidecarImpl.dispatch" -}}
{{- $in := index . 0 -}}
{{- $what := index . 1 -}}
{{- $root := $in -}}
{{- $name := "outbox-relay" -}}
{{- if hasKey $in "root" -}}
{{- $root = $in.root -}}
{{- $name = $in.chart | default $name -}}
{{- end -}}
{{- $scope := index ($root.Subcharts | default dict) $name -}}
{{- if not $scope -}}
{{- fail (printf "outbox-relay.sidecar: chart %q has no dependency named %q; list outbox-relay under dependencies in its Chart.yaml (with an alias, pass (dict \"root\" $ \"chart\" \"ALIAS\"))" $root.Chart.Name $name) -}}
{{- end -}}
{{- if ne $scope.Values.mode "sidecar" -}}
{{- fail (printf "outbox-relay.sidecar: set %s.mode=sidecar in %s's values (it is %q, which also deploys a fleet)" $name $root.Chart.Name $scope.Values.mode) -}}
{{- end -}}
{{- include (printf "outbox-relay.sidecarImpl.%s" $what) $scope -}}
{{- end -}}

{{- define "outbox-relay.sidecarImpl.item" -}}
- {{ include "outbox-relay.container" . | nindent 2 | trim }}
{{- if .Values.sidecar.native }}
  restartPolicy: Always
{{- end }}
{{- end -}}

{{- define "outbox-relay.sidecarImpl.containers" -}}
{{- if not .Values.sidecar.native -}}
{{ include "outbox-relay.sidecarImpl.item" . }}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.sidecarImpl.initContainers" -}}
{{- if .Values.sidecar.native -}}
{{ include "outbox-relay.sidecarImpl.item" . }}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.sidecarImpl.volumes" -}}
{{ include "outbox-relay.volumes" . }}
{{- end -}}

{{- define "outbox-relay.sidecarImpl.podAnnotations" -}}
{{ include "outbox-relay.checksumAnnotations" . }}
{{- end -}}

{{- define "outbox-relay.sidecarImpl.terminationGracePeriodSeconds" -}}
{{ include "outbox-relay.minTerminationGracePeriodSeconds" . }}
{{- end -}}
