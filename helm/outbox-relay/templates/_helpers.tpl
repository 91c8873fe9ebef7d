{{/*
Helpers shared by the fleet Deployment, the sidecar templates (_sidecar.tpl) and the
migration Job. Every helper takes the chart's own scope: in sidecar mode _sidecar.tpl passes
the subchart's scope (.Subcharts), so names, values and the image resolve the same way.
*/}}

{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The fleet's relay pods (not the migration Job's): Deployment, Service, PDB, NetworkPolicy. */}}
{{- define "outbox-relay.relaySelectorLabels" -}}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/component: relay
{{- end -}}

{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-relay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secret the chart creates for values given inline (url, apiKey.value). */}}
{{- define "outbox-relay.secretName" -}}
{{- include "outbox-relay.fullname" . -}}
{{- end -}}

{{/* "true" when at least one secret value is given inline, so the chart creates a Secret. */}}
{{- define "outbox-relay.createsSecret" -}}
{{- $creates := and (not .Values.database.existingSecret) .Values.database.url -}}
{{- if and .Values.amqp.enabled (not .Values.amqp.existingSecret) .Values.amqp.url -}}
{{- $creates = true -}}
{{- end -}}
{{- range $name, $provider := .Values.providers -}}
{{- if and (not $provider.apiKey.existingSecret) $provider.apiKey.value -}}
{{- $creates = true -}}
{{- end -}}
{{- end -}}
{{- if .Values.webhooks.enabled -}}
{{- range $name, $endpoint := .Values.webhooks.endpoints -}}
{{- if and (not $endpoint.existingSecret) $endpoint.secrets -}}
{{- $creates = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $creates }}true{{ end -}}
{{- end -}}

{{/* Where the secret files appear inside the relay container. */}}
{{- define "outbox-relay.secretsMountPath" -}}/var/run/secrets/outbox-relay{{- end -}}

{{/*
Seconds a pod's terminationGracePeriodSeconds must leave beyond relay.shutdownGraceSeconds.
The relay's whole shutdown (stop claiming, drain, release, final flush) ends within its
grace counted from SIGTERM, the flush getting at least 1 s even when the drain used it
all; the margin covers that second, closing connections, and the exit itself.
*/}}
{{- define "outbox-relay.terminationGraceMarginSeconds" -}}15{{- end -}}

{{/* Minimum termination grace for a pod that runs a relay: its shutdown grace plus the margin. */}}
{{- define "outbox-relay.minTerminationGracePeriodSeconds" -}}
{{- add (ceil .Values.relay.shutdownGraceSeconds | int64) (include "outbox-relay.terminationGraceMarginSeconds" . | int64) -}}
{{- end -}}

{{/* "true" when the relay container gets a readinessProbe: probes.readiness.enabled, or by
mode when it is unset (on in fleet mode; off in sidecar mode, where the probe would make
the application's pods NotReady whenever the relay's database is away). */}}
{{- define "outbox-relay.readinessProbeEnabled" -}}
{{- $enabled := .Values.probes.readiness.enabled -}}
{{- if kindIs "invalid" $enabled -}}
{{- $enabled = eq .Values.mode "fleet" -}}
{{- end -}}
{{- if $enabled }}true{{ end -}}
{{- end -}}

{{/* "true" when the Grafana dashboard ConfigMap is rendered: metrics.grafanaDashboard.enabled,
or by mode when it is unset (on in fleet mode; off in sidecar mode, where every application
chart that includes the relay would ship another copy of the same dashboard uid). */}}
{{- define "outbox-relay.grafanaDashboardEnabled" -}}
{{- $enabled := .Values.metrics.grafanaDashboard.enabled -}}
{{- if kindIs "invalid" $enabled -}}
{{- $enabled = eq .Values.mode "fleet" -}}
{{- end -}}
{{- if $enabled }}true{{ end -}}
{{- end -}}

{{/*
RELAY_* variables the chart sets itself, each with the value to set instead. An extraEnv
entry with one of these names would silently replace the chart's value and bypass its
checks (grace against terminationGracePeriodSeconds, timeouts against the lease, secrets as
files), so the validation refuses it.
*/}}
{{- define "outbox-relay.managedEnv" -}}
RELAY_LOG_FORMAT: relay.logFormat
RELAY_HTTP_PORT: relay.httpPort
RELAY_BATCH_SIZE: relay.batchSize
RELAY_MAX_IN_FLIGHT: relay.maxInFlight
RELAY_LEASE_SECONDS: relay.leaseSeconds
RELAY_MAX_ATTEMPTS: relay.maxAttempts
RELAY_SHUTDOWN_GRACE_SECONDS: relay.shutdownGraceSeconds
RELAY_DB_POOL_SIZE: relay.dbPoolSize
RELAY_DATABASE_URL: database.existingSecret or database.url (mounted as a file)
RELAY_DATABASE_URL_FILE: database.existingSecret or database.url (mounted as a file)
RELAY_AMQP_URL: amqp.enabled with amqp.existingSecret or amqp.url (mounted as a file)
RELAY_AMQP_URL_FILE: amqp.enabled with amqp.existingSecret or amqp.url (mounted as a file)
RELAY_INSTANCE_NAME: nothing (the chart names each relay after its pod)
{{- end -}}

{{/* The same for a provider's RELAY_PROVIDERS__<NAME>__<FIELD>: field -> key under providers.<name>. */}}
{{- define "outbox-relay.managedProviderEnv" -}}
KIND: kind
BASE_URL: baseUrl
CONCURRENCY: concurrency
TIMEOUT_MS: timeoutMs
CONNECT_TIMEOUT_MS: connectTimeoutMs
API_KEY: apiKey.existingSecret or apiKey.value (mounted as a file)
API_KEY_FILE: apiKey.existingSecret or apiKey.value (mounted as a file)
{{- end -}}

{{/*
Refuse, at install time, combinations that values.schema.json cannot express, each with
a message naming the value to change.
*/}}
{{- define "outbox-relay.validate" -}}
{{- $v := .Values -}}
{{- if and $v.database.existingSecret $v.database.url -}}
{{- fail "outbox-relay: set only one of database.existingSecret and database.url" -}}
{{- end -}}
{{- if not (or $v.database.existingSecret $v.database.url) -}}
{{- fail "outbox-relay: the database URL is required: set database.existingSecret (a Secret with the URL under database.secretKey) or database.url" -}}
{{- end -}}
{{- if not $v.providers -}}
{{- fail "outbox-relay: at least one provider is required, e.g. providers.stripe.apiKey.existingSecret=stripe-api-key" -}}
{{- end -}}
{{- range $name, $p := $v.providers -}}
{{- if and $p.apiKey.existingSecret $p.apiKey.value -}}
{{- fail (printf "outbox-relay: set only one of providers.%s.apiKey.existingSecret and providers.%s.apiKey.value" $name $name) -}}
{{- end -}}
{{- if not (or $p.apiKey.existingSecret $p.apiKey.value) -}}
{{- fail (printf "outbox-relay: providers.%s needs an API key: set providers.%s.apiKey.existingSecret or providers.%s.apiKey.value" $name $name $name) -}}
{{- end -}}
{{- $timeoutMs := $p.timeoutMs | default 10000 | float64 -}}
{{- if ge $timeoutMs (mulf $v.relay.leaseSeconds 1000) -}}
{{- fail (printf "outbox-relay: providers.%s.timeoutMs (%v) must stay below relay.leaseSeconds (%v s) so that a live call never outlasts its lease" $name $timeoutMs $v.relay.leaseSeconds) -}}
{{- end -}}
{{- end -}}
{{- $managed := include "outbox-relay.managedEnv" . | fromYaml -}}
{{- $managedProvider := include "outbox-relay.managedProviderEnv" . | fromYaml -}}
{{- range $key, $_ := $v.relay.extraEnv -}}
{{- if hasKey $managed $key -}}
{{- fail (printf "outbox-relay: relay.extraEnv.%s would override a variable the chart sets (and bypass its checks); set %s instead" $key (get $managed $key)) -}}
{{- end -}}
{{- if hasPrefix "RELAY_PROVIDERS__" $key -}}
{{- $parts := splitList "__" $key -}}
{{- $name := lower (index $parts 1) -}}
{{- $field := rest (rest $parts) | join "__" -}}
{{- $instead := printf "providers.%s.extraEnv.%s" $name $field -}}
{{- if hasKey $managedProvider $field -}}
{{- $instead = printf "providers.%s.%s" $name (get $managedProvider $field) -}}
{{- end -}}
{{- fail (printf "outbox-relay: relay.extraEnv.%s configures a provider lane, which the chart builds from providers.<name> (its API key mounted as a file); set %s instead" $key $instead) -}}
{{- end -}}
{{- end -}}
{{- range $name, $p := $v.providers -}}
{{- range $key, $_ := $p.extraEnv -}}
{{- if hasKey $managedProvider $key -}}
{{- fail (printf "outbox-relay: providers.%s.extraEnv.%s would override a variable the chart sets (and bypass its checks); set providers.%s.%s instead" $name $key $name (get $managedProvider $key)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.amqp.enabled -}}
{{- /* The relay refuses to start when an event's publish could outlast its lease
(relay/infra/config.py); say so at install time instead of in a crash loop. */ -}}
{{- $publishTimeout := get ($v.relay.extraEnv | default dict) "RELAY_PUBLISH_TIMEOUT_SECONDS" | default "15" -}}
{{- if ge (float64 $publishTimeout) (float64 $v.relay.leaseSeconds) -}}
{{- fail (printf "outbox-relay: with amqp.enabled, relay.leaseSeconds (%v) must be above the events publish timeout (%v s, RELAY_PUBLISH_TIMEOUT_SECONDS), or the relay refuses to start; raise relay.leaseSeconds above %v or set relay.extraEnv.RELAY_PUBLISH_TIMEOUT_SECONDS below %v" $v.relay.leaseSeconds $publishTimeout $publishTimeout $v.relay.leaseSeconds) -}}
{{- end -}}
{{- if and $v.amqp.existingSecret $v.amqp.url -}}
{{- fail "outbox-relay: set only one of amqp.existingSecret and amqp.url" -}}
{{- end -}}
{{- if not (or $v.amqp.existingSecret $v.amqp.url) -}}
{{- fail "outbox-relay: amqp.enabled needs amqp.existingSecret or amqp.url" -}}
{{- end -}}
{{- end -}}
{{- if eq $v.mode "fleet" -}}
{{- /* In sidecar mode the application's pod owns terminationGracePeriodSeconds; the
sidecar template renders exactly this minimum for it. */ -}}
{{- $minGrace := include "outbox-relay.minTerminationGracePeriodSeconds" . | int64 -}}
{{- if lt (float64 $v.terminationGracePeriodSeconds) (float64 $minGrace) -}}
{{- fail (printf "outbox-relay: terminationGracePeriodSeconds (%v) must be at least relay.shutdownGraceSeconds (%v) + %s = %d, or the kubelet kills relays that are still draining or flushing" $v.terminationGracePeriodSeconds $v.relay.shutdownGraceSeconds (include "outbox-relay.terminationGraceMarginSeconds" .) $minGrace) -}}
{{- end -}}
{{- if $v.podDisruptionBudget.enabled -}}
{{- $max := toString $v.podDisruptionBudget.maxUnavailable -}}
{{- $min := toString $v.podDisruptionBudget.minAvailable -}}
{{- if eq (ne $max "") (ne $min "") -}}
{{- fail "outbox-relay: set exactly one of podDisruptionBudget.maxUnavailable and podDisruptionBudget.minAvailable (the other to \"\")" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.mode "sidecar") $v.metrics.podMonitor.enabled (not $v.metrics.podMonitor.selector) -}}
{{- fail "outbox-relay: in sidecar mode metrics.podMonitor.selector must name the application's pod labels" -}}
{{- end -}}
{{- if and (eq $v.mode "sidecar") $v.sidecar.native (semverCompare "<1.29-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "outbox-relay: sidecar.native needs Kubernetes 1.29 or later (this cluster: %s); set sidecar.native=false" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}

{{/* The RELAY_* variables of the ConfigMap, sorted, as YAML key: "value" lines. */}}
{{- define "outbox-relay.env" -}}
{{- $v := .Values -}}
{{- $mount := include "outbox-relay.secretsMountPath" . -}}
{{- $env := dict
  "RELAY_LOG_FORMAT" $v.relay.logFormat
  "RELAY_HTTP_PORT" (int64 $v.relay.httpPort | toString)
  "RELAY_BATCH_SIZE" (int64 $v.relay.batchSize | toString)
  "RELAY_MAX_IN_FLIGHT" (int64 $v.relay.maxInFlight | toString)
  "RELAY_LEASE_SECONDS" (toString $v.relay.leaseSeconds)
  "RELAY_MAX_ATTEMPTS" (int64 $v.relay.maxAttempts | toString)
  "RELAY_SHUTDOWN_GRACE_SECONDS" (toString $v.relay.shutdownGraceSeconds)
  "RELAY_DB_POOL_SIZE" (int64 $v.relay.dbPoolSize | toString)
  "RELAY_DATABASE_URL_FILE" (printf "%s/database/url" $mount)
-}}
{{- if $v.amqp.enabled -}}
{{- $_ := set $env "RELAY_AMQP_URL_FILE" (printf "%s/amqp/url" $mount) -}}
{{- end -}}
{{- range $name, $p := $v.providers -}}
{{- $prefix := printf "RELAY_PROVIDERS__%s__" (upper $name) -}}
{{- $_ := set $env (print $prefix "KIND") ($p.kind | default "stripe") -}}
{{- $_ := set $env (print $prefix "API_KEY_FILE") (printf "%s/providers/%s/api-key" $mount $name) -}}
{{- if $p.baseUrl -}}
{{- $_ := set $env (print $prefix "BASE_URL") $p.baseUrl -}}
{{- end -}}
{{- if $p.concurrency -}}
{{- $_ := set $env (print $prefix "CONCURRENCY") (int64 $p.concurrency | toString) -}}
{{- end -}}
{{- if $p.timeoutMs -}}
{{- $_ := set $env (print $prefix "TIMEOUT_MS") (int64 $p.timeoutMs | toString) -}}
{{- end -}}
{{- if $p.connectTimeoutMs -}}
{{- $_ := set $env (print $prefix "CONNECT_TIMEOUT_MS") (int64 $p.connectTimeoutMs | toString) -}}
{{- end -}}
{{- range $key, $value := $p.extraEnv -}}
{{- $_ := set $env (print $prefix $key) $value -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := $v.relay.extraEnv -}}
{{- $_ := set $env $key $value -}}
{{- end -}}
{{- range $key := keys $env | sortAlpha }}
{{ $key }}: {{ get $env $key | quote }}
{{- end -}}
{{- end -}}

{{/* The projected volume of secret files: database/url, amqp/url, providers/NAME/api-key. */}}
{{- define "outbox-relay.secretsVolume" -}}
{{- $v := .Values -}}
{{- $created := include "outbox-relay.secretName" . -}}
- name: outbox-relay-secrets
  projected:
    defaultMode: {{ int64 $v.secretFileMode }}
    sources:
      - secret:
          name: {{ $v.database.existingSecret | default $created }}
          items:
            - key: {{ ternary $v.database.secretKey "database-url" (ne $v.database.existingSecret "") }}
              path: database/url
      {{- if $v.amqp.enabled }}
      - secret:
          name: {{ $v.amqp.existingSecret | default $created }}
          items:
            - key: {{ ternary $v.amqp.secretKey "amqp-url" (ne $v.amqp.existingSecret "") }}
              path: amqp/url
      {{- end }}
      {{- range $name, $p := $v.providers }}
      - secret:
          name: {{ $p.apiKey.existingSecret | default $created }}
          items:
            - key: {{ ternary ($p.apiKey.secretKey | default "api-key") (printf "provider-%s-api-key" $name) (ne ($p.apiKey.existingSecret | default "") "") }}
              path: providers/{{ $name }}/api-key
      {{- end }}
{{- end -}}

{{/* Every volume the relay container mounts. */}}
{{- define "outbox-relay.volumes" -}}
{{ include "outbox-relay.secretsVolume" . }}
- name: outbox-relay-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The relay container (a map, not a list item): the same in the fleet Deployment and in an
application's pod, so probes, securityContext and mounts cannot drift between the modes.
*/}}
{{- define "outbox-relay.container" -}}
name: {{ ternary .Values.sidecar.containerName "relay" (eq .Values.mode "sidecar") }}
image: {{ include "outbox-relay.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["run"]
envFrom:
  - configMapRef:
      name: {{ include "outbox-relay.fullname" . }}
env:
  - name: RELAY_INSTANCE_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
ports:
  - name: relay-http
    containerPort: {{ int64 .Values.relay.httpPort }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /healthz
    port: relay-http
  {{- toYaml .Values.probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: relay-http
  {{- toYaml .Values.probes.liveness | nindent 2 }}
{{- if include "outbox-relay.readinessProbeEnabled" . }}
readinessProbe:
  httpGet:
    path: /readyz
    port: relay-http
  {{- toYaml (omit .Values.probes.readiness "enabled") | nindent 2 }}
{{- end }}
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
volumeMounts:
  - name: outbox-relay-secrets
    mountPath: {{ include "outbox-relay.secretsMountPath" . }}
    readOnly: true
  - name: outbox-relay-tmp
    mountPath: /tmp
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Pod annotations that roll the pods when the relay's configuration or created Secret changes. */}}
{{- define "outbox-relay.checksumAnnotations" -}}
checksum/outbox-relay-config: {{ include "outbox-relay.env" . | sha256sum }}
{{- if include "outbox-relay.createsSecret" . }}
checksum/outbox-relay-secret: {{ include "outbox-relay.secretData" . | sha256sum }}
{{- end }}
{{- end -}}

{{/* data: of the created Secret (base64). */}}
{{- define "outbox-relay.secretData" -}}
{{- $v := .Values -}}
{{- if and (not $v.database.existingSecret) $v.database.url }}
database-url: {{ $v.database.url | b64enc | quote }}
{{- end }}
{{- if and $v.amqp.enabled (not $v.amqp.existingSecret) $v.amqp.url }}
amqp-url: {{ $v.amqp.url | b64enc | quote }}
{{- end }}
{{- range $name, $p := $v.providers }}
{{- if and (not $p.apiKey.existingSecret) $p.apiKey.value }}
provider-{{ $name }}-api-key: {{ $p.apiKey.value | b64enc | quote }}
{{- end }}
{{- end }}
{{- if $v.webhooks.enabled }}
{{- range $name, $e := $v.webhooks.endpoints }}
{{- if and (not $e.existingSecret) $e.secrets }}
webhook-{{ $name }}-secrets: {{ join "\n" $e.secrets | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}


{{/* The webhook receiver's pods (`outbox-relay webhooks serve`): its Deployment and Service. */}}
{{- define "outbox-relay.webhooksSelectorLabels" -}}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/component: webhooks
{{- end -}}

{{- define "outbox-relay.webhooksFullname" -}}
{{- printf "%s-webhooks" (include "outbox-relay.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
