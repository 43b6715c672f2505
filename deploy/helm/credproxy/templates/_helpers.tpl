{{/*
Names and labels.
*/}}
{{- define "credproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "credproxy.fullname" -}}
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

{{- define "credproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "credproxy.labels" -}}
helm.sh/chart: {{ include "credproxy.chart" . }}
{{ include "credproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "credproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "credproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The example app's name (sidecar mode). */}}
{{- define "credproxy.appName" -}}
{{- default (include "credproxy.fullname" .) .Values.app.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the pods running credproxy: the app's in sidecar mode, the DaemonSet's otherwise. */}}
{{- define "credproxy.podSelectorLabels" -}}
{{- if eq .Values.mode "sidecar" -}}
app.kubernetes.io/name: {{ include "credproxy.appName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- else -}}
{{ include "credproxy.selectorLabels" . }}
{{- end }}
{{- end }}

{{- define "credproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "credproxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "credproxy.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/*
Listeners. In a pod (sidecar) the proxies listen on loopback, reachable only by
the pod's own containers; the admin listener is on all addresses for probes and
Prometheus. On a node (daemonset) everything listens on the node's IP.
*/}}
{{- define "credproxy.adminListen" -}}
{{- if and (eq .Values.mode "daemonset") .Values.daemonset.nodeIP -}}
${HOST_IP}:{{ int .Values.admin.port }}
{{- else -}}
0.0.0.0:{{ int .Values.admin.port }}
{{- end }}
{{- end }}

{{- define "credproxy.httpListen" -}}
{{- if eq .Values.mode "daemonset" -}}
${HOST_IP}:{{ int .Values.http.port }}
{{- else -}}
127.0.0.1:{{ int .Values.http.port }}
{{- end }}
{{- end }}

{{/* Whether Vault credentials are mounted: "true" or "". */}}
{{- define "credproxy.vaultCredentials" -}}
{{- if and .Values.vault.address (or (has .Values.vault.auth.method (list "kubernetes" "jwt")) .Values.vault.auth.secretName) -}}
true
{{- end }}
{{- end }}

{{/*
credproxy.yaml. Built as a dict and written with toYaml, so no value can break
the YAML; credproxy then checks it strictly (unknown keys are errors).
*/}}
{{- define "credproxy.config" -}}
{{- $v := .Values -}}
{{- $ds := eq $v.mode "daemonset" -}}
{{- if and (not $v.postgres) (not $v.http.enabled) -}}
{{- fail "credproxy: configure at least one postgres entry or set http.enabled" -}}
{{- end -}}
{{- if and $ds (not $v.daemonset.socket) (not $v.daemonset.nodeIP) -}}
{{- fail "credproxy: daemonset mode needs daemonset.socket or daemonset.nodeIP" -}}
{{- end -}}
{{- if and $ds $v.http.enabled (not $v.daemonset.nodeIP) -}}
{{- fail "credproxy: in daemonset mode the HTTP proxy listens on the node IP: set daemonset.nodeIP" -}}
{{- end -}}
{{- $cfg := dict "shutdown_grace" ($v.shutdownGrace | default (ternary "30s" "10s" $ds)) "admin" (dict "listen" (include "credproxy.adminListen" .)) "audit" $v.audit "secrets" $v.secrets -}}
{{- if $v.vault.address -}}
{{- $vault := omit $v.vault "auth" -}}
{{- range $k, $val := $vault -}}
{{- if eq (toString $val) "" -}}
{{- $_ := unset $vault $k -}}
{{- end -}}
{{- end -}}
{{- $auth := dict "method" $v.vault.auth.method -}}
{{- if $v.vault.auth.mount -}}
{{- $_ := set $auth "mount" $v.vault.auth.mount -}}
{{- end -}}
{{- if has $v.vault.auth.method (list "kubernetes" "jwt") -}}
{{- $_ := set $auth "role" $v.vault.auth.role -}}
{{- $_ := set $auth "jwt_file" "/var/run/secrets/vault/token" -}}
{{- else if eq $v.vault.auth.method "approle" -}}
{{- if not $v.vault.auth.secretName -}}
{{- fail "credproxy: vault.auth.secretName (keys role-id, secret-id) is required for approle" -}}
{{- end -}}
{{- $_ := set $auth "role_id_file" "/var/run/secrets/vault/role-id" -}}
{{- $_ := set $auth "secret_id_file" "/var/run/secrets/vault/secret-id" -}}
{{- else if eq $v.vault.auth.method "token" -}}
{{- if not $v.vault.auth.secretName -}}
{{- fail "credproxy: vault.auth.secretName (key token) is required for token auth" -}}
{{- end -}}
{{- $_ := set $auth "token_file" "/var/run/secrets/vault/token" -}}
{{- end -}}
{{- $_ := set $vault "auth" $auth -}}
{{- $_ := set $cfg "vault" $vault -}}
{{- end -}}
{{- $pg := list -}}
{{- range $v.postgres -}}
{{- $port := int (default 5432 (get . "port")) -}}
{{- $base := omit . "port" -}}
{{- if $ds -}}
{{- if $v.daemonset.socket -}}
{{- $pg = append $pg (merge (dict "listen" (printf "unix:%s/.s.PGSQL.%d" $v.daemonset.socketDir $port) "socket_mode" "0600") $base) -}}
{{- end -}}
{{- if $v.daemonset.nodeIP -}}
{{- $pg = append $pg (merge (dict "name" (printf "%s-node" .name) "listen" (printf "${HOST_IP}:%d" $port)) $base) -}}
{{- end -}}
{{- else -}}
{{- $pg = append $pg (merge (dict "listen" (printf "127.0.0.1:%d" $port)) $base) -}}
{{- end -}}
{{- end -}}
{{- if $pg -}}
{{- $_ := set $cfg "postgres" $pg -}}
{{- end -}}
{{- if $v.http.enabled -}}
{{- $ca := dict "cert_file" "/var/run/secrets/credproxy/ca/ca.pem" "key_file" "/var/run/secrets/credproxy/ca/ca-key.pem" -}}
{{- $http := dict "listen" (include "credproxy.httpListen" .) "ca" $ca "default" $v.http.default "routes" $v.http.routes -}}
{{- if $ds -}}
{{- /* On the node's IP, not loopback: credproxy refuses that without this opt-in. */ -}}
{{- $_ := set $http "allow_non_loopback" true -}}
{{- end -}}
{{- if $v.http.upstream_ca_file -}}
{{- $_ := set $http "upstream_ca_file" $v.http.upstream_ca_file -}}
{{- end -}}
{{- $_ := set $cfg "http" $http -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end }}

{{/* Pod annotations: scrape hints, and a config checksum when credproxy does not --watch. */}}
{{- define "credproxy.podAnnotations" -}}
{{- if .Values.prometheusScrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.admin.port | int | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- if not .Values.watch }}
checksum/config: {{ include "credproxy.config" . | sha256sum }}
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "credproxy.podSecurityContext" -}}
runAsNonRoot: true
# Secret, ConfigMap and token files are group-readable by credproxy's group.
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "credproxy.probes" -}}
startupProbe:
  # Passes once the config is loaded, the listeners are bound and the
  # credential sources are ready. A native sidecar's startupProbe holds back
  # the app's start until then.
  httpGet:
    path: /readyz
    port: credproxy-admin
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet:
    path: /healthz
    port: credproxy-admin
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  # 503 while draining or while a credential source is not ready.
  httpGet:
    path: /readyz
    port: credproxy-admin
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end }}

{{/* The credproxy container, in either mode. */}}
{{- define "credproxy.container" -}}
name: credproxy
image: {{ include "credproxy.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args:
  - run
  - --config
  - /etc/credproxy/credproxy.yaml
  - --log-level
  - {{ .Values.logLevel }}
  {{- if .Values.watch }}
  - --watch
  {{- end }}
{{- if or (eq .Values.mode "daemonset") .Values.env }}
env:
  {{- if eq .Values.mode "daemonset" }}
  # ${HOST_IP} in credproxy.yaml.
  - name: HOST_IP
    valueFrom:
      fieldRef:
        fieldPath: status.hostIP
  {{- end }}
  {{- with .Values.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
ports:
  {{- if eq .Values.mode "daemonset" }}
  {{- if .Values.daemonset.nodeIP }}
  {{- range $i, $pg := .Values.postgres }}
  - name: {{ printf "postgres-%d" $i }}
    containerPort: {{ int (default 5432 (get $pg "port")) }}
    protocol: TCP
  {{- end }}
  {{- end }}
  {{- if .Values.http.enabled }}
  - name: http-proxy
    containerPort: {{ int .Values.http.port }}
    protocol: TCP
  {{- end }}
  {{- end }}
  - name: credproxy-admin
    containerPort: {{ int .Values.admin.port }}
    protocol: TCP
{{ include "credproxy.probes" . }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
volumeMounts:
  - name: credproxy-config
    mountPath: /etc/credproxy
    readOnly: true
  {{- if .Values.http.enabled }}
  - name: credproxy-ca
    mountPath: /var/run/secrets/credproxy/ca
    readOnly: true
  {{- end }}
  {{- if include "credproxy.vaultCredentials" . }}
  - name: vault-credentials
    mountPath: /var/run/secrets/vault
    readOnly: true
  {{- end }}
  {{- if and (eq .Values.mode "daemonset") .Values.daemonset.socket }}
  - name: socket-dir
    mountPath: {{ .Values.daemonset.socketDir }}
  {{- end }}
{{- end }}

{{/* credproxy as a native sidecar: an init container that keeps running. */}}
{{- define "credproxy.sidecar" -}}
{{ include "credproxy.container" . }}
restartPolicy: Always
{{- end }}

{{/* The volumes the credproxy container mounts. */}}
{{- define "credproxy.volumes" -}}
# credproxy.yaml, with the files it names under files/.
- name: credproxy-config
  projected:
    defaultMode: 0440
    sources:
      - configMap:
          name: {{ include "credproxy.fullname" . }}
          items:
            - key: credproxy.yaml
              path: credproxy.yaml
      {{- range .Values.files }}
      {{- if hasKey . "configMap" }}
      - configMap:
          name: {{ .configMap }}
          items:
            - key: {{ .key | quote }}
              path: {{ printf "files/%s" .path | quote }}
      {{- else }}
      - secret:
          name: {{ .secret }}
          items:
            - key: {{ .key | quote }}
              path: {{ printf "files/%s" .path | quote }}
      {{- end }}
      {{- end }}
{{- if .Values.http.enabled }}
# The interception CA and its key, for credproxy only.
- name: credproxy-ca
  secret:
    secretName: {{ .Values.http.caSecret }}
    defaultMode: 0440
    items:
      - key: ca.pem
        path: ca.pem
      - key: ca-key.pem
        path: ca-key.pem
{{- end }}
{{- if include "credproxy.vaultCredentials" . }}
- name: vault-credentials
  {{- if has .Values.vault.auth.method (list "kubernetes" "jwt") }}
  # A short-lived token for Vault only (audience), rotated by the kubelet.
  projected:
    defaultMode: 0440
    sources:
      - serviceAccountToken:
          audience: {{ .Values.vault.auth.tokenAudience }}
          expirationSeconds: {{ int .Values.vault.auth.tokenExpirationSeconds }}
          path: token
  {{- else if eq .Values.vault.auth.method "approle" }}
  secret:
    secretName: {{ .Values.vault.auth.secretName }}
    defaultMode: 0440
    items:
      - key: role-id
        path: role-id
      - key: secret-id
        path: secret-id
  {{- else }}
  secret:
    secretName: {{ .Values.vault.auth.secretName }}
    defaultMode: 0440
    items:
      - key: token
        path: token
  {{- end }}
{{- end }}
{{- if and (eq .Values.mode "daemonset") .Values.daemonset.socket }}
- name: socket-dir
  hostPath:
    path: {{ .Values.daemonset.socketDir }}
    type: DirectoryOrCreate
{{- end }}
{{- end }}

{{/* Sidecar mode: what the app container needs. */}}
{{- define "credproxy.appEnv" -}}
{{- $first := first .Values.postgres }}
{{- if $first }}
# PostgreSQL through credproxy, on loopback: no password anywhere.
- name: PGHOST
  value: 127.0.0.1
- name: PGPORT
  value: {{ int (default 5432 (get $first "port")) | quote }}
- name: PGSSLMODE
  value: disable
{{- end }}
{{- if .Values.http.enabled }}
{{- $proxy := printf "http://127.0.0.1:%d" (int .Values.http.port) }}
# HTTP(S) through credproxy; curl reads only the lower-case http_proxy.
{{- range list "HTTP_PROXY" "HTTPS_PROXY" "http_proxy" "https_proxy" }}
- name: {{ . }}
  value: {{ $proxy }}
{{- end }}
- name: NO_PROXY
  value: {{ $.Values.app.noProxy | quote }}
- name: no_proxy
  value: {{ $.Values.app.noProxy | quote }}
{{- if .Values.app.caBundle.enabled }}
# These replace the trust store: system roots plus credproxy's CA.
- name: SSL_CERT_FILE
  value: /etc/ssl/credproxy/ca-certificates.crt
- name: REQUESTS_CA_BUNDLE
  value: /etc/ssl/credproxy/ca-certificates.crt
{{- end }}
# Node adds this to its roots.
- name: NODE_EXTRA_CA_CERTS
  value: /etc/credproxy-ca/ca.pem
{{- end }}
{{- end }}

{{- define "credproxy.appVolumeMounts" -}}
{{- if .Values.http.enabled }}
# The CA's certificate only: the app never sees ca-key.pem.
- name: credproxy-ca-cert
  mountPath: /etc/credproxy-ca
  readOnly: true
{{- if .Values.app.caBundle.enabled }}
- name: ca-bundle
  mountPath: /etc/ssl/credproxy
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "credproxy.appVolumes" -}}
{{- if .Values.http.enabled }}
- name: credproxy-ca-cert
  secret:
    secretName: {{ .Values.http.caSecret }}
    defaultMode: 0444
    items:
      - key: ca.pem
        path: ca.pem
{{- if .Values.app.caBundle.enabled }}
- name: ca-bundle
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- end }}
{{- end }}

{{/* Writes the app's trust bundle: the app image's roots plus credproxy's CA. */}}
{{- define "credproxy.caBundleInit" -}}
name: ca-bundle
image: {{ .Values.app.image.repository }}:{{ .Values.app.image.tag }}
imagePullPolicy: {{ .Values.app.image.pullPolicy }}
command:
  - sh
  - -c
  - {{ printf "cat %s /etc/credproxy-ca/ca.pem > /etc/ssl/credproxy/ca-certificates.crt" .Values.app.caBundle.systemBundle | quote }}
resources:
  requests: {cpu: 10m, memory: 16Mi}
  limits: {memory: 32Mi}
securityContext:
  {{- toYaml .Values.app.securityContext | nindent 2 }}
volumeMounts:
  - name: credproxy-ca-cert
    mountPath: /etc/credproxy-ca
    readOnly: true
  - name: ca-bundle
    mountPath: /etc/ssl/credproxy
{{- end }}

{{/* The sidecar's init containers: the CA bundle writer (when needed), then credproxy. */}}
{{- define "credproxy.sidecarInitContainers" -}}
{{- if and .Values.http.enabled .Values.app.caBundle.enabled }}
- {{ include "credproxy.caBundleInit" . | indent 2 | trim }}
{{- end }}
- {{ include "credproxy.sidecar" . | indent 2 | trim }}
{{- end }}

{{/*
Sidecar mode, for your own workloads: the pod-spec fragment to merge (printed
by NOTES.txt; the example Deployment is built from the same pieces).
*/}}
{{- define "credproxy.podSpecFragment" -}}
serviceAccountName: {{ include "credproxy.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- include "credproxy.podSecurityContext" . | trim | nindent 2 }}
initContainers:
  {{- include "credproxy.sidecarInitContainers" . | trim | nindent 2 }}
containers:
  - name: app          # your container: add this env and these volumeMounts
    env:
      {{- include "credproxy.appEnv" . | trim | nindent 6 }}
    {{- with include "credproxy.appVolumeMounts" . | trim }}
    volumeMounts:
      {{- . | nindent 6 }}
    {{- end }}
volumes:
  {{- include "credproxy.volumes" . | trim | nindent 2 }}
  {{- with include "credproxy.appVolumes" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
{{- end }}
