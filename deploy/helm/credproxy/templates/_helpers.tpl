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
Prometheus. On a node (daemonset) the proxies listen in each app pod: its own
sockets in its CSI volume, and loopback in its own network namespace; the
admin listener is on credproxy's pod IP.
*/}}
{{- define "credproxy.adminListen" -}}
{{- if eq .Values.mode "daemonset" -}}
${POD_IP}:{{ int .Values.admin.port }}
{{- else -}}
0.0.0.0:{{ int .Values.admin.port }}
{{- end }}
{{- end }}

{{- define "credproxy.httpListen" -}}
127.0.0.1:{{ int .Values.http.port }}
{{- end }}

{{/* Whether Vault credentials are mounted: "true" or "". A DaemonSet logs in as each app pod, never as itself. */}}
{{- define "credproxy.vaultCredentials" -}}
{{- if and .Values.vault.address (ne .Values.mode "daemonset") (or (has .Values.vault.auth.method (list "kubernetes" "jwt")) .Values.vault.auth.secretName) -}}
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
{{- if and $ds (not $v.daemonset.rules) -}}
{{- fail "credproxy: daemonset mode refuses every pod no rule matches: list at least one in daemonset.rules" -}}
{{- end -}}
{{- $cfg := dict "shutdown_grace" ($v.shutdownGrace | default (ternary "30s" "10s" $ds)) "admin" (dict "listen" (include "credproxy.adminListen" .)) "audit" $v.audit "secrets" $v.secrets -}}
{{- if $v.vault.address -}}
{{- $vault := omit $v.vault "auth" -}}
{{- range $k, $val := $vault -}}
{{- if eq (toString $val) "" -}}
{{- $_ := unset $vault $k -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "vault" $vault -}}
{{- if not $ds -}}
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
{{- end -}}
{{- end -}}
{{- $pg := list -}}
{{- range $v.postgres -}}
{{- $port := int (default 5432 (get . "port")) -}}
{{- $base := omit . "port" -}}
{{- if $ds -}}
{{- /* A socket in each app pod's own directory. */ -}}
{{- $pg = append $pg (merge (dict "listen" (printf "unix:.s.PGSQL.%d" $port)) $base) -}}
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
{{- if $v.http.upstream_ca_file -}}
{{- $_ := set $http "upstream_ca_file" $v.http.upstream_ca_file -}}
{{- end -}}
{{- $_ := set $cfg "http" $http -}}
{{- end -}}
{{- if $ds -}}
{{- $csi := dict "endpoint" "unix:/csi/csi.sock" "driver" $v.daemonset.driver "audience" $v.daemonset.audience "state_dir" $v.daemonset.stateDir -}}
{{- $_ := set $cfg "workloads" (dict "attribution" "csi" "node_name" "${NODE_NAME}" "peer_check" $v.daemonset.peerCheck "csi" $csi "rules" $v.daemonset.rules) -}}
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
{{- if eq .Values.mode "daemonset" -}}
# The node plugin runs as root (its container says so); the registrar too.
seccompProfile:
  type: RuntimeDefault
{{- else -}}
runAsNonRoot: true
# Secret, ConfigMap and token files are group-readable by credproxy's group.
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}
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
  # ${NODE_NAME} and ${POD_IP} in credproxy.yaml.
  - name: NODE_NAME
    valueFrom:
      fieldRef:
        fieldPath: spec.nodeName
  - name: POD_IP
    valueFrom:
      fieldRef:
        fieldPath: status.podIP
  {{- end }}
  {{- with .Values.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
ports:
  - name: credproxy-admin
    containerPort: {{ int .Values.admin.port }}
    protocol: TCP
{{ include "credproxy.probes" . }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- if eq .Values.mode "daemonset" }}
  # Mounts into the kubelet's pod directories (Bidirectional propagation
  # needs privileged), enters pods' network namespaces, reads the node's
  # processes (hostPID). The root filesystem stays read-only.
  privileged: true
  runAsUser: 0
  readOnlyRootFilesystem: true
  {{- else }}
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
  {{- end }}
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
  {{- if eq .Values.mode "daemonset" }}
  - name: kube-api-access
    mountPath: /var/run/secrets/kubernetes.io/serviceaccount
    readOnly: true
  - name: plugin-dir
    mountPath: /csi
  - name: mountpoint-dir
    mountPath: {{ printf "%s/pods" .Values.daemonset.kubeletDir }}
    mountPropagation: Bidirectional
  - name: state-dir
    mountPath: {{ .Values.daemonset.stateDir }}
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
{{- if eq .Values.mode "daemonset" }}
# The API client's token (credproxy reads the node's pods), for credproxy's
# container only: the registrar gets none.
- name: kube-api-access
  projected:
    defaultMode: 0440
    sources:
      - serviceAccountToken:
          expirationSeconds: 3600
          path: token
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
# The plugin's socket, which the kubelet calls.
- name: plugin-dir
  hostPath:
    path: {{ printf "%s/plugins/%s" .Values.daemonset.kubeletDir .Values.daemonset.driver }}
    type: DirectoryOrCreate
# Where node-driver-registrar registers the plugin with the kubelet.
- name: registration-dir
  hostPath:
    path: {{ printf "%s/plugins_registry" .Values.daemonset.kubeletDir }}
    type: Directory
# The kubelet's pod directories: each app pod's volume is bind-mounted there.
- name: mountpoint-dir
  hostPath:
    path: {{ printf "%s/pods" .Values.daemonset.kubeletDir }}
    type: DirectoryOrCreate
# The app pods' own directories, holding their sockets.
- name: state-dir
  hostPath:
    path: {{ .Values.daemonset.stateDir }}
    type: DirectoryOrCreate
{{- end }}
{{- end }}

{{/* Sidecar mode: what the app container needs. */}}
{{- define "credproxy.appEnv" -}}
{{- $first := first .Values.postgres }}
{{- if $first }}
{{- if eq .Values.mode "daemonset" }}
# PostgreSQL through credproxy: a directory, where libpq finds
# .s.PGSQL.$PGPORT, this pod's own socket. No password anywhere.
- name: PGHOST
  value: {{ .Values.daemonset.mountPath }}
{{- else }}
# PostgreSQL through credproxy, on loopback: no password anywhere.
- name: PGHOST
  value: 127.0.0.1
{{- end }}
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
{{- if eq .Values.mode "daemonset" }}
# This pod's own credproxy sockets (read-only is enough to connect).
- name: credproxy
  mountPath: {{ .Values.daemonset.mountPath }}
  readOnly: true
{{- end }}
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
{{- if eq .Values.mode "daemonset" }}
# This pod's own credproxy sockets: the kubelet asks credproxy's node
# plugin for them, telling it which pod this is.
- name: credproxy
  csi:
    driver: {{ .Values.daemonset.driver }}
    readOnly: true
{{- end }}
{{- if .Values.http.enabled }}
- name: credproxy-ca-cert
  {{- if eq .Values.mode "daemonset" }}
  # In the app's namespace: the CA's certificate alone, never its key.
  configMap:
    name: {{ .Values.http.appCAConfigMap }}
  {{- else }}
  secret:
    secretName: {{ .Values.http.caSecret }}
    defaultMode: 0444
  {{- end }}
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
{{- if eq .Values.mode "daemonset" }}
{{- include "credproxy.appPodSpecFragment" . }}
{{- else -}}
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
{{- end }}

{{/*
Daemonset mode, for an app pod on the node: its own sockets (an inline volume
of credproxy's CSI driver, allowed at Pod Security "restricted") and the
proxy on its own loopback. The pod's service account is who it is: a rule in
daemonset.rules must name it and its namespace.
*/}}
{{- define "credproxy.appPodSpecFragment" -}}
# serviceAccountName: your app's, which daemonset.rules names
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  seccompProfile:
    type: RuntimeDefault
{{- if and .Values.http.enabled .Values.app.caBundle.enabled }}
initContainers:
  - {{ include "credproxy.caBundleInit" . | indent 4 | trim }}
{{- end }}
containers:
  - name: app          # your container: add this env and these volumeMounts
    env:
      {{- include "credproxy.appEnv" . | trim | nindent 6 }}
    volumeMounts:
      {{- include "credproxy.appVolumeMounts" . | trim | nindent 6 }}
volumes:
  {{- include "credproxy.appVolumes" . | trim | nindent 2 }}
{{- end }}
