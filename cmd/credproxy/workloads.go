package main

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"go.uber.org/zap"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/identity/csi"
	"github.com/credproxy/credproxy/proxy"
)

// startAttribution runs what ties connections to pods in DaemonSet mode
// (workloads.attribution: csi, the CSI node plugin, driving srv). It
// returns a function that stops it; without a workloads block it does
// nothing.
func startAttribution(cfg *config.Config, srv *proxy.Server, log *zap.Logger) (stop func(), err error) {
	w := cfg.Workloads
	if w == nil {
		return func() {}, nil
	}
	if w.Attribution != config.AttributionCSI {
		return nil, fmt.Errorf("workloads.attribution %q is not supported", w.Attribution)
	}
	kube, err := kubeClient()
	if err != nil {
		return nil, fmt.Errorf("workloads: kubernetes client: %w", err)
	}
	plugin, err := csi.New(csi.Options{Driver: w.CSI.Driver, Audience: w.CSI.Audience, Node: w.NodeName,
		StateDir: w.CSI.StateDir, Version: version, Host: srv, Kube: kube, Logger: log})
	if err != nil {
		return nil, err
	}
	ln, err := csi.Listen(w.CSI.Endpoint)
	if err != nil {
		return nil, fmt.Errorf("workloads.csi.endpoint: %w", err)
	}
	if !srv.PeerCheck() {
		log.Warn("peer check off: connections on a pod's socket are the pod's by construction only " +
			"(run with hostPID for the cgroup check, or set workloads.peer_check)")
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := plugin.Serve(ln); err != nil {
			log.Error("csi node plugin stopped", zap.Error(err))
		}
	}()
	return func() {
		plugin.Close()
		wg.Wait()
	}, nil
}

// kubeClient is the in-cluster client, or $KUBECONFIG's outside a
// cluster.
func kubeClient() (kubernetes.Interface, error) {
	rc, err := rest.InClusterConfig()
	if errors.Is(err, rest.ErrNotInCluster) && os.Getenv("KUBECONFIG") != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", os.Getenv("KUBECONFIG"))
	}
	if err != nil {
		return nil, err
	}
	rc.UserAgent = "credproxy/" + version
	return kubernetes.NewForConfig(rc)
}
