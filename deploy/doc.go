// Package deploy holds credproxy's deployment artifacts: the container image
// (Dockerfile), Kubernetes manifests for the sidecar and DaemonSet modes, the
// Helm chart, and the Grafana dashboard and Prometheus rules. It has no code;
// its tests check that the artifacts decode strictly into the Kubernetes API
// types, that the credproxy configs they carry pass credproxy's own config
// validation, that the chart renders and validates in both modes, that the
// alert rules parse and fire, and that the image's binary builds static.
// Without -short they also submit the manifests and the rendered chart to a
// real kube-apiserver (integration/kubetest), whose schema, defaulting and
// Pod Security admission must accept them.
package deploy
