{{/*
Names, labels and the few derived facts every template shares.
*/}}

{{- define "idlegate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 63 characters (DNS label). The release name is used as
is when it already contains the chart name.
*/}}
{{- define "idlegate.fullname" -}}
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

{{- define "idlegate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
`<fullname>-<suffix>` within 63 characters: the fullname is cut first, so the suffix that
tells the objects apart survives. Call with (list . "metrics").
*/}}
{{- define "idlegate.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "idlegate.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "idlegate.metrics.fullname" -}}
{{- include "idlegate.suffixedName" (list . "metrics") }}
{{- end }}

{{/*
The image tag (or appVersion) as a label value: at most 63 characters of [A-Za-z0-9_.-],
beginning and ending alphanumeric; empty (the label is left out) when nothing of it is left.
*/}}
{{- define "idlegate.versionLabel" -}}
{{- $version := regexReplaceAll "[^A-Za-z0-9_.-]" (default .Chart.AppVersion .Values.image.tag) "_" | trunc 63 }}
{{- regexReplaceAll "^[^A-Za-z0-9]+|[^A-Za-z0-9]+$" $version "" }}
{{- end }}

{{/* Labels on every object of the release (app.kubernetes.io/* recommended labels). */}}
{{- define "idlegate.commonLabels" -}}
helm.sh/chart: {{ include "idlegate.chart" . }}
app.kubernetes.io/name: {{ include "idlegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- with include "idlegate.versionLabel" . }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: idlegate
{{- end }}

{{/* Selector of the gateway pods; the component keeps the trial Redis out of it. */}}
{{- define "idlegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idlegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "idlegate.labels" -}}
{{ include "idlegate.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* The metrics Service carries its own component so a ServiceMonitor selects only it. */}}
{{- define "idlegate.metrics.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idlegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: metrics
{{- end }}

{{- define "idlegate.redis.fullname" -}}
{{- include "idlegate.suffixedName" (list . "redis") }}
{{- end }}

{{- define "idlegate.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idlegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "idlegate.redis.labels" -}}
{{ include "idlegate.commonLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "idlegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "idlegate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: digest wins over tag; the tag defaults to the chart's appVersion. */}}
{{- define "idlegate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where the admin token Secret is mounted; config.admin.token_file points at it. */}}
{{- define "idlegate.adminTokenDir" -}}/run/secrets/idlegate/admin{{- end }}
{{- define "idlegate.adminTokenFile" -}}{{ include "idlegate.adminTokenDir" . }}/token{{- end }}

{{/*
A gateway duration (900, "90s", "250ms", "15m", "1h30m") as whole seconds, rounded up.
Call with (list <value> <field path for the error message>).
*/}}
{{- define "idlegate.seconds" -}}
{{- $raw := toString (index . 0) | nospace }}
{{- $field := index . 1 }}
{{- if regexMatch "^[0-9]+(\\.[0-9]+)?$" $raw }}
{{- $raw | float64 | ceil | int }}
{{- else }}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 }}
{{- $parts := regexFindAll "[0-9]+(\\.[0-9]+)?(ms|s|m|h|d)" $raw -1 }}
{{- if or (not $parts) (ne (join "" $parts) $raw) }}
{{- fail (printf "%s: invalid duration %q: use 900, 90s, 15m or 1h30m" $field $raw) }}
{{- end }}
{{- $total := 0.0 }}
{{- range $parts }}
{{- $unit := regexReplaceAll "^[0-9.]+" . "" }}
{{- $number := regexFind "^[0-9.]+" . | float64 }}
{{- $total = addf $total (mulf $number (get $units $unit)) }}
{{- end }}
{{- $total | ceil | int }}
{{- end }}
{{- end }}

{{- define "idlegate.shutdownGraceSeconds" -}}
{{- $server := default (dict) .Values.config.server }}
{{- $grace := "20s" }}
{{- if hasKey $server "shutdown_grace" }}{{ $grace = get $server "shutdown_grace" }}{{ end }}
{{- include "idlegate.seconds" (list $grace "config.server.shutdown_grace") }}
{{- end }}

{{/* The preStop sleep action needs no shell but exists only from Kubernetes 1.30. */}}
{{- define "idlegate.preStopSleepSeconds" -}}
{{- if semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version }}
{{- int .Values.drain.preStopSleepSeconds }}
{{- else }}0{{- end }}
{{- end }}

{{/*
Long enough for the preStop sleep, then the gateway's own drain (shutdown_grace), then a
margin: the kubelet must not SIGKILL a pod that is still finishing requests.
*/}}
{{- define "idlegate.terminationGracePeriodSeconds" -}}
{{- $needed := add (include "idlegate.preStopSleepSeconds" . | int) (include "idlegate.shutdownGraceSeconds" . | int) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed (int .Values.drain.extraGraceSeconds) }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed drain.preStopSleepSeconds + config.server.shutdown_grace (%d s), or the kubelet kills requests mid-drain" (int .Values.terminationGracePeriodSeconds) $needed) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Does the gateway end up on the per-process memory store? */}}
{{- define "idlegate.storeIsMemory" -}}
{{- $store := default (dict) .Values.config.store }}
{{- $url := toString (default "memory://" (get $store "url")) }}
{{- if and (not .Values.redis.enabled) (not .Values.secrets.storeUrl.existingSecret) (hasPrefix "memory://" $url) }}true{{- end }}
{{- end }}

{{/*
The gateway config file: .Values.config plus what the chart wires in (store URL of the
trial Redis, the admin token file, the hash key env name). Never holds a secret value.
*/}}
{{- define "idlegate.gatewayConfig" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $store := deepCopy (default (dict) $cfg.store) }}
{{- if .Values.redis.enabled }}
{{- $_ := set $store "url" (printf "redis://%s:%d/0" (include "idlegate.redis.fullname" .) (int .Values.redis.port)) }}
{{- else if .Values.secrets.storeUrl.existingSecret }}
{{- $_ := unset $store "url" }}
{{- end }}
{{- if .Values.secrets.storeHashKey.existingSecret }}
{{- $_ := set $store "hash_key_env" .Values.secrets.storeHashKey.env }}
{{- end }}
{{- $_ := set $cfg "store" $store }}
{{- if eq .Values.mode "forward-auth" }}
{{- $forwardAuth := deepCopy (default (dict) $cfg.forward_auth) }}
{{- $_ := set $forwardAuth "enabled" true }}
{{- $_ := set $cfg "forward_auth" $forwardAuth }}
{{- end }}
{{- if .Values.secrets.adminToken.existingSecret }}
{{- $admin := deepCopy (default (dict) $cfg.admin) }}
{{- $_ := set $admin "token_file" (include "idlegate.adminTokenFile" .) }}
{{- $_ := set $cfg "admin" $admin }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{- define "idlegate.listenPort" -}}
{{- $listen := default (dict) .Values.config.listen }}
{{- int (default 8080 (get $listen "port")) }}
{{- end }}

{{- define "idlegate.adminPort" -}}
{{- $admin := default (dict) .Values.config.admin }}
{{- int (default 9090 (get $admin "port")) }}
{{- end }}

{{/* Does the gateway answer forward-auth (mode forward-auth, or config.forward_auth.enabled)? */}}
{{- define "idlegate.forwardAuthEnabled" -}}
{{- $forwardAuth := default (dict) .Values.config.forward_auth }}
{{- if or (eq .Values.mode "forward-auth") (get $forwardAuth "enabled") }}true{{- end }}
{{- end }}

{{/*
forward_auth.listen, the dedicated forward-auth port, when the gateway serves it ("true"):
the container port `auth`, a Service port and a NetworkPolicy rule follow it.
*/}}
{{- define "idlegate.authListen" -}}
{{- $forwardAuth := default (dict) .Values.config.forward_auth }}
{{- if and (include "idlegate.forwardAuthEnabled" .) (kindIs "map" (get $forwardAuth "listen")) }}true{{- end }}
{{- end }}

{{/* The dedicated forward-auth port; the gateway's default port when only a host is given. */}}
{{- define "idlegate.authPort" -}}
{{- $forwardAuth := default (dict) .Values.config.forward_auth }}
{{- $listen := default (dict) (get $forwardAuth "listen") }}
{{- int (default 8080 (get $listen "port")) }}
{{- end }}

{{/* The proxy Service's port for `auth`: service.authPort, else the container's own. */}}
{{- define "idlegate.authServicePort" -}}
{{- if kindIs "invalid" .Values.service.authPort }}
{{- include "idlegate.authPort" . }}
{{- else }}
{{- int .Values.service.authPort }}
{{- end }}
{{- end }}

{{/*
The ingress controller's auth URL: the dedicated port when there is one (it answers every
path), else /.idlegate/auth on the proxy port.
*/}}
{{- define "idlegate.authUrl" -}}
{{- $port := .Values.service.port }}
{{- if include "idlegate.authListen" . }}{{ $port = include "idlegate.authServicePort" . }}{{ end }}
{{- printf "http://%s.%s.svc.cluster.local:%v/.idlegate/auth" (include "idlegate.fullname" .) .Release.Namespace $port }}
{{- end }}

{{/*
What credential a URL carries, "" if none: the same things gateway/config.py `mask_url` hides
(and so knows to be secret), for values that would otherwise land in the ConfigMap or the pod
spec. A password in the userinfo (the redis factory reads it up to the last `@`, so it may hold
`/` and `@`); any userinfo of an http(s) URL (aiohttp sends it as Basic auth, and a user name
alone may be a token); a query option named like a credential (`_SECRET_OPTION`: password,
sentinel_password, ssl_password, api_key, access_token, client_secret, sig, ...) with a value;
and an option name with a `%` escape, which the gateway decodes (pass%77ord is a password).
Never says the URL itself.
*/}}
{{- define "idlegate.urlCredential" -}}
{{- $url := toString . }}
{{- $secretOption := "(?i)[?&#][^=&#]*(pass(word|wd)?|pwd|secret|token|key|sig(nature)?|credentials?|auth(orization)?)\\s*=[^&#]" }}
{{- $encodedOption := "[?&#][^=&#]*%[^=&#]*=[^&#]" }}
{{- if regexMatch "(?i)^(https?|wss?)://[^/?#]*@" $url }}credentials in its userinfo (user[:password]@)
{{- else if regexMatch "://.*:[^@]+@" $url }}a password in its userinfo (user:password@)
{{- else if regexMatch $secretOption $url }}a credential in query option {{ regexFind $secretOption $url | regexFind "[^?&#=]+" | trim | quote }} (a password, key, token or signature)
{{- else if regexMatch $encodedOption $url }}a percent-encoded query option name {{ regexFind $encodedOption $url | regexFind "[^?&#=]+" | quote }} (it may spell password or another credential)
{{- end }}
{{- end }}

{{/*
A URL as NOTES.txt may print it: the userinfo's password and credential-like query options
as ***, as `mask_url` shows them. The chart refuses such URLs anyway; this is the second lock.
*/}}
{{- define "idlegate.maskedUrl" -}}
{{- $url := regexReplaceAll "^([^:/?#]*://[^:@]*):.*@" (toString .) "${1}:***@" }}
{{- regexReplaceAll "(?i)([?&#][^=&#]*(pass(word|wd)?|pwd|secret|token|key|sig(nature)?|credentials?|auth(orization)?|%[^=&#]*)\\s*=)[^&#]+" $url "${1}***" }}
{{- end }}

{{/*
Refuse a URL-valued config key that carries a credential: the ConfigMap is readable by anyone
who may read the namespace's config. Call with (list <url> <field path> <env override name>).
*/}}
{{- define "idlegate.refuseUrlCredential" -}}
{{- $why := include "idlegate.urlCredential" (index . 0) }}
{{- if $why }}
{{- fail (printf "%s carries %s and would land in a ConfigMap: keep it here without the credential and pass the full URL from a Secret, as extraEnv [{name: %s, valueFrom: {secretKeyRef: {name: <secret>, key: <key>}}}]." (index . 1) $why (index . 2)) }}
{{- end }}
{{- end }}

{{/*
Refuse values that would install but not work, or would leak a secret. Rendered once,
from the Deployment template.
*/}}
{{- define "idlegate.validate" -}}
{{- if include "idlegate.storeIsMemory" . }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount > 1 needs a shared store: the memory:// store keeps idle times per pod. Set secrets.storeUrl.existingSecret (or redis.enabled for a trial)." }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs a shared store: the memory:// store keeps idle times per pod. Set secrets.storeUrl.existingSecret (or redis.enabled for a trial)." }}
{{- end }}
{{- if gt (int .Values.workers) 1 }}
{{- fail "workers > 1 needs a shared store: the memory:// store keeps idle times per process. Set secrets.storeUrl.existingSecret (or redis.enabled for a trial)." }}
{{- end }}
{{- end }}
{{- if and .Values.redis.enabled .Values.secrets.storeUrl.existingSecret }}
{{- fail "redis.enabled and secrets.storeUrl.existingSecret both set the store URL: choose one." }}
{{- end }}
{{- $fullname := include "idlegate.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $fullname) }}
{{- fail (printf "resource name %q (<release>-<chart>) is no valid Service name, which must start with a lowercase letter and hold only a-z, 0-9 and '-': set fullnameOverride." $fullname) }}
{{- end }}
{{- if has $fullname (list (include "idlegate.metrics.fullname" .) (include "idlegate.redis.fullname" .)) }}
{{- fail (printf "fullnameOverride %q, cut to fit a suffix, names the metrics or Redis Service too: choose a name that does not end in -metrics or -redis." $fullname) }}
{{- end }}
{{- $store := default (dict) .Values.config.store }}
{{- $storeWhy := include "idlegate.urlCredential" (default "" (get $store "url")) }}
{{- if $storeWhy }}
{{- fail (printf "config.store.url carries %s and would land in a ConfigMap: put the URL in a Secret and set secrets.storeUrl.existingSecret." $storeWhy) }}
{{- end }}
{{- range $i, $provider := .Values.config.providers }}
{{- if $provider.jwks_uri }}
{{- include "idlegate.refuseUrlCredential" (list $provider.jwks_uri (printf "config.providers[%d].jwks_uri" $i) (printf "IDLEGATE_PROVIDERS__%d__JWKS_URI" $i)) }}
{{- end }}
{{- if kindIs "slice" $provider.issuer }}
{{- range $j, $issuer := $provider.issuer }}
{{- include "idlegate.refuseUrlCredential" (list $issuer (printf "config.providers[%d].issuer[%d]" $i $j) (printf "IDLEGATE_PROVIDERS__%d__ISSUER__%d" $i $j)) }}
{{- end }}
{{- else }}
{{- include "idlegate.refuseUrlCredential" (list (default "" $provider.issuer) (printf "config.providers[%d].issuer" $i) (printf "IDLEGATE_PROVIDERS__%d__ISSUER" $i)) }}
{{- end }}
{{- end }}
{{- range $i, $route := .Values.config.routes }}
{{- if $route.upstream }}
{{- include "idlegate.refuseUrlCredential" (list $route.upstream (printf "config.routes[%d].upstream" $i) (printf "IDLEGATE_ROUTES__%d__UPSTREAM" $i)) }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if and (hasKey . "value") (contains "://" (toString .value)) }}
{{- $why := include "idlegate.urlCredential" .value }}
{{- if $why }}
{{- fail (printf "extraEnv %s: its value carries %s and would sit in the Deployment in plain text: use valueFrom.secretKeyRef." .name $why) }}
{{- end }}
{{- end }}
{{- end }}
{{- $admin := default (dict) .Values.config.admin }}
{{- if has (toString (default "127.0.0.1" (get $admin "host"))) (list "127.0.0.1" "localhost" "::1") }}
{{- fail "config.admin.host must not be loopback in a pod: kubelet probes and Prometheus connect to the pod IP (use 0.0.0.0)." }}
{{- end }}
{{- if eq (include "idlegate.listenPort" .) (include "idlegate.adminPort" .) }}
{{- fail "config.listen.port and config.admin.port must differ." }}
{{- end }}
{{- $hmacEnvs := list }}
{{- range .Values.secrets.hmac }}{{ $hmacEnvs = append $hmacEnvs .env }}{{ end }}
{{- range .Values.config.providers }}
{{- if and .hmac_secret_env (not (has .hmac_secret_env $hmacEnvs)) }}
{{- fail (printf "provider %s: hmac_secret_env %s has no entry in secrets.hmac (env, existingSecret, key)." .name .hmac_secret_env) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas." }}
{{- end }}
{{- if and .Values.autoscaling.enabled (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) (kindIs "invalid" .Values.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage." }}
{{- end }}
{{- if .Values.podDisruptionBudget.enabled }}
{{- if and (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both." }}
{{- end }}
{{- if and (kindIs "invalid" .Values.podDisruptionBudget.minAvailable) (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable." }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled (the ServiceMonitor scrapes that Service)." }}
{{- end }}
{{- $forwardAuth := default (dict) .Values.config.forward_auth }}
{{- if get $forwardAuth "listen" }}
{{- if not (include "idlegate.forwardAuthEnabled" .) }}
{{- fail "config.forward_auth.listen is served only with forward-auth on: set mode: forward-auth (or config.forward_auth.enabled: true), or leave listen unset." }}
{{- end }}
{{- $authListen := get $forwardAuth "listen" }}
{{- if has (toString (default "0.0.0.0" (get $authListen "host"))) (list "127.0.0.1" "localhost" "::1") }}
{{- fail "config.forward_auth.listen.host must not be loopback in a pod: the ingress controller connects to the pod IP (use 0.0.0.0)." }}
{{- end }}
{{- $authPort := include "idlegate.authPort" . }}
{{- if eq $authPort (include "idlegate.listenPort" .) }}
{{- fail (printf "config.forward_auth.listen.port: %s is also config.listen.port; each listener needs its own port." $authPort) }}
{{- end }}
{{- if eq $authPort (include "idlegate.adminPort" .) }}
{{- fail (printf "config.forward_auth.listen.port: %s is also config.admin.port; each listener needs its own port." $authPort) }}
{{- end }}
{{- if eq (include "idlegate.authServicePort" .) (toString (int .Values.service.port)) }}
{{- fail (printf "service.authPort: %s is also service.port; the Service needs a port for each (set service.authPort)." (include "idlegate.authServicePort" .)) }}
{{- end }}
{{- end }}
{{- if eq .Values.mode "forward-auth" }}
{{- $trusted := default (list) (get $forwardAuth "trusted_proxies") }}
{{- if not (without $trusted "127.0.0.0/8" "::1/128") }}
{{- fail "mode forward-auth needs config.forward_auth.trusted_proxies: the CIDRs your ingress controller's pods connect from (e.g. the pod CIDR); with loopback only, every decision is refused untrusted_proxy." }}
{{- end }}
{{- end }}
{{- $_ := include "idlegate.terminationGracePeriodSeconds" . }}
{{- end }}
