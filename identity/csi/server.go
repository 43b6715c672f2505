// Package csi is credproxy's CSI node plugin: how a DaemonSet credproxy
// learns, from the kubelet itself, which pod a connection belongs to.
//
// An app pod mounts an inline CSI volume of credproxy's driver. When the
// kubelet sets the pod up it calls NodePublishVolume with the pod's
// namespace, name, UID and service account (CSIDriver podInfoOnMount) and
// a token it minted for the pod's service account, bound to the pod, for
// credproxy's audience (CSIDriver tokenRequests). The plugin checks the
// kubelet's word against the token's claims and the API server, asks its
// Host (the engine) to serve the pod, and bind-mounts the pod's own
// directory — holding the pod's own sockets — read-only at the volume's
// target path. A connection on those sockets is the pod's by
// construction: no other pod has them. The kubelet republishes the volume
// periodically (requiresRepublish) with a fresh token, and unpublishes it
// when the pod goes; a watch on the node's pods withdraws a deleted pod
// even if the kubelet never says so.
package csi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/credproxy/credproxy/identity"
)

// Keys of the volume context the kubelet passes (CSIDriver podInfoOnMount
// and tokenRequests).
const (
	ctxPodName        = "csi.storage.k8s.io/pod.name"
	ctxPodNamespace   = "csi.storage.k8s.io/pod.namespace"
	ctxPodUID         = "csi.storage.k8s.io/pod.uid"
	ctxServiceAccount = "csi.storage.k8s.io/serviceAccount.name"
	ctxEphemeral      = "csi.storage.k8s.io/ephemeral"
	ctxTokens         = "csi.storage.k8s.io/serviceAccount.tokens"
)

// Host serves the pods the plugin publishes: the engine
// (*proxy.Server). PublishWorkload is called again on a republish, with
// the fresh token.
type Host interface {
	PublishWorkload(w *identity.Workload, dir string) error
	UnpublishWorkload(podUID string) bool
}

// Options configure a Server.
type Options struct {
	Driver   string // the CSIDriver name
	Audience string // the token audience the driver requests
	Node     string // this node's name
	StateDir string // one directory per pod below it
	Version  string // reported as vendor_version
	Host     Host
	// Kube checks the kubelet's word against the API server (the pod
	// exists with that UID, on this node, with that service account) and
	// watches the node's pods; nil skips both.
	Kube   kubernetes.Interface
	Logger *zap.Logger
	// Mounter bind-mounts a pod's directory at the volume's target path;
	// nil: bind mounts (Linux, CAP_SYS_ADMIN).
	Mounter Mounter
}

// Mounter exposes a directory at a target path and takes it away again.
type Mounter interface {
	Mount(dir, target string) error
	Unmount(target string) error
}

// Server is the CSI Identity and Node service.
type Server struct {
	csipb.UnimplementedIdentityServer
	csipb.UnimplementedNodeServer

	o   Options
	log *zap.Logger

	mu      sync.Mutex
	volumes map[string]*volume // by volume ID
	pods    map[string]int     // volumes published per pod UID

	grpc *grpc.Server
	ln   net.Listener
	// hookWatching runs each time the pod watch is established (tests).
	hookWatching func()
	wg           sync.WaitGroup
	cancel       context.CancelFunc
}

type volume struct {
	podUID, target string
}

// New checks o and prepares the state directory; nothing is served until
// Serve.
func New(o Options) (*Server, error) {
	if o.Host == nil || o.Driver == "" || o.Node == "" || o.StateDir == "" || o.Audience == "" {
		return nil, errors.New("csi: Host, Driver, Node, StateDir and Audience are required")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Mounter == nil {
		o.Mounter = bindMounter{}
	}
	// Only root may walk the state directory: a pod reaches its own
	// directory through its bind mount, never through this one.
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("csi: state dir: %w", err)
	}
	if err := os.Chmod(o.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("csi: state dir: %w", err)
	}
	s := &Server{o: o, log: o.Logger.Named("csi"), volumes: map[string]*volume{}, pods: map[string]int{}}
	s.grpc = grpc.NewServer(grpc.UnaryInterceptor(s.logCalls))
	csipb.RegisterIdentityServer(s.grpc, s)
	csipb.RegisterNodeServer(s.grpc, s)
	return s, nil
}

// Listen binds endpoint (unix:/path), replacing a stale socket, with mode
// 0600: only the kubelet (root) calls it.
func Listen(endpoint string) (net.Listener, error) {
	path, ok := strings.CutPrefix(endpoint, "unix:")
	if !ok {
		return nil, fmt.Errorf("csi endpoint %q: want unix:/path", endpoint)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// Serve answers CSI calls on ln and, with Options.Kube, watches the node's
// pods, until Close. It returns once Close was called.
func (s *Server) Serve(ln net.Listener) error {
	ctx, cancel := context.WithCancel(context.Background())
	s.mu.Lock()
	s.ln, s.cancel = ln, cancel
	s.mu.Unlock()
	if s.o.Kube != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.watchPods(ctx)
		}()
	}
	s.log.Info("csi node plugin serving", zap.String("endpoint", ln.Addr().String()), zap.String("driver", s.o.Driver))
	err := s.grpc.Serve(ln)
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// Close stops serving (calls in flight finish) and the pod watch. Pods
// stay published: the engine's shutdown ends them, and the bind mounts
// stay for the kubelet to unpublish.
func (s *Server) Close() {
	s.grpc.GracefulStop()
	s.mu.Lock()
	cancel := s.cancel
	s.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	s.wg.Wait()
}

// logCalls logs each call's method and outcome; never a request, which
// holds the pod's token.
func (s *Server) logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	if err != nil {
		s.log.Warn("csi call failed", zap.String("method", info.FullMethod), zap.Duration("duration", time.Since(start)), zap.Error(err))
	} else if ce := s.log.Check(zap.DebugLevel, "csi call"); ce != nil {
		ce.Write(zap.String("method", info.FullMethod), zap.Duration("duration", time.Since(start)))
	}
	return resp, err
}

// GetPluginInfo names the driver.
func (s *Server) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	return &csipb.GetPluginInfoResponse{Name: s.o.Driver, VendorVersion: s.o.Version}, nil
}

// GetPluginCapabilities: a node plugin only, no controller service.
func (s *Server) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	return &csipb.GetPluginCapabilitiesResponse{}, nil
}

// Probe reports ready.
func (s *Server) Probe(context.Context, *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	return &csipb.ProbeResponse{}, nil
}

// NodeGetCapabilities: no staging, no stats.
func (s *Server) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	return &csipb.NodeGetCapabilitiesResponse{}, nil
}

// NodeGetInfo names the node.
func (s *Server) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{NodeId: s.o.Node}, nil
}

// NodePublishVolume publishes the pod the volume belongs to (or refreshes
// its token on a republish) and mounts its directory at the target path.
func (s *Server) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	if req.GetVolumeId() == "" || req.GetTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id and target_path are required")
	}
	if req.GetVolumeCapability().GetMount() == nil {
		return nil, status.Error(codes.InvalidArgument, "credproxy volumes are mounted filesystems (volumeMode: Filesystem)")
	}
	w, err := s.workload(ctx, req.GetVolumeContext(), req.GetSecrets())
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(s.o.StateDir, w.PodUID)
	s.mu.Lock()
	defer s.mu.Unlock()
	if v, ok := s.volumes[req.GetVolumeId()]; ok {
		if v.podUID != w.PodUID || v.target != req.GetTargetPath() {
			return nil, status.Error(codes.AlreadyExists, "volume published for another pod or target path")
		}
		// Republish: a fresh token for the pod.
		if err := s.o.Host.PublishWorkload(w, dir); err != nil {
			return nil, status.Errorf(codes.Unavailable, "refresh the pod's token: %v", err)
		}
		return &csipb.NodePublishVolumeResponse{}, nil
	}
	first := s.pods[w.PodUID] == 0
	created := false
	if first {
		var err error
		if created, err = resetDir(dir); err != nil {
			return nil, status.Errorf(codes.Internal, "pod directory: %v", err)
		}
	}
	if err := s.o.Host.PublishWorkload(w, dir); err != nil {
		if created {
			_ = os.RemoveAll(dir)
		}
		return nil, status.Errorf(codes.Unavailable, "serve the pod: %v", err)
	}
	if err := s.o.Mounter.Mount(dir, req.GetTargetPath()); err != nil {
		if first {
			s.o.Host.UnpublishWorkload(w.PodUID)
		}
		if created {
			_ = os.RemoveAll(dir)
		}
		return nil, status.Errorf(codes.Internal, "mount the pod's directory: %v", err)
	}
	s.volumes[req.GetVolumeId()] = &volume{podUID: w.PodUID, target: req.GetTargetPath()}
	s.pods[w.PodUID]++
	s.log.Info("volume published", zap.Object("workload", w), zap.String("target", req.GetTargetPath()))
	return &csipb.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the volume; the pod's last volume
// withdraws the pod (its sessions end, its credentials are revoked).
// Unpublishing an unknown volume succeeds, as CSI asks.
func (s *Server) NodeUnpublishVolume(_ context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	if req.GetVolumeId() == "" || req.GetTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id and target_path are required")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.o.Mounter.Unmount(req.GetTargetPath()); err != nil {
		return nil, status.Errorf(codes.Internal, "unmount: %v", err)
	}
	v, ok := s.volumes[req.GetVolumeId()]
	if !ok {
		return &csipb.NodeUnpublishVolumeResponse{}, nil
	}
	delete(s.volumes, req.GetVolumeId())
	s.pods[v.podUID]--
	if s.pods[v.podUID] <= 0 {
		delete(s.pods, v.podUID)
		s.withdraw(v.podUID)
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

// resetDir makes dir an empty directory of mode 0755 and reports whether
// it had to create it. An existing dir is emptied, never replaced: after
// credproxy restarts, the kubelet republishes each running pod's volume,
// and the pod's containers keep the bind mount of this very directory they
// started with, so the new sockets must appear in it.
func resetDir(dir string) (created bool, err error) {
	fi, err := os.Lstat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return true, os.Mkdir(dir, 0o755)
	case err != nil:
		return false, err
	case !fi.IsDir():
		if err := os.Remove(dir); err != nil {
			return false, err
		}
		return true, os.Mkdir(dir, 0o755)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false, err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return false, err
		}
	}
	return false, os.Chmod(dir, 0o755)
}

// withdraw ends a pod and removes its directory. s.mu is held.
func (s *Server) withdraw(podUID string) {
	s.o.Host.UnpublishWorkload(podUID)
	if err := os.RemoveAll(filepath.Join(s.o.StateDir, podUID)); err != nil {
		s.log.Warn("remove a pod's directory", zap.String("pod_uid", podUID), zap.Error(err))
	}
	s.log.Info("pod withdrawn", zap.String("pod_uid", podUID))
}

// podGone withdraws a pod the API server says is gone, unmounting its
// volumes (the kubelet will find nothing left to unpublish).
func (s *Server) podGone(podUID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pods[podUID] == 0 {
		return
	}
	for id, v := range s.volumes {
		if v.podUID == podUID {
			if err := s.o.Mounter.Unmount(v.target); err != nil {
				s.log.Warn("unmount a deleted pod's volume", zap.String("target", v.target), zap.Error(err))
			}
			delete(s.volumes, id)
		}
	}
	delete(s.pods, podUID)
	s.withdraw(podUID)
}

// workload reads the pod the kubelet names in the volume context and
// checks it: an inline (ephemeral) volume, a token for credproxy's
// audience whose claims name the same pod, service account and node, and,
// with Kube, the pod as the API server has it.
func (s *Server) workload(ctx context.Context, vc, secrets map[string]string) (*identity.Workload, error) {
	if vc[ctxEphemeral] != "true" {
		return nil, status.Error(codes.InvalidArgument, "credproxy volumes are inline (ephemeral) CSI volumes of the pod; "+
			"a PersistentVolume could be mounted by any pod")
	}
	w := identity.Workload{Namespace: vc[ctxPodNamespace], Pod: vc[ctxPodName], PodUID: vc[ctxPodUID],
		ServiceAccount: vc[ctxServiceAccount], Node: s.o.Node}
	if w.Namespace == "" || w.Pod == "" || w.PodUID == "" || w.ServiceAccount == "" {
		return nil, status.Error(codes.InvalidArgument, "no pod information in the volume context: the CSIDriver needs podInfoOnMount: true")
	}
	var tokens map[string]struct {
		Token               string    `json:"token"`
		ExpirationTimestamp time.Time `json:"expirationTimestamp"`
	}
	// With the CSIDriver's serviceAccountTokenInSecrets the kubelet sends
	// the tokens as a CSI secret (never logged by CSI tooling); without,
	// in the volume context.
	raw, ok := secrets[ctxTokens]
	if !ok {
		raw = vc[ctxTokens]
	}
	if err := json.Unmarshal([]byte(raw), &tokens); err != nil || tokens[s.o.Audience].Token == "" {
		return nil, status.Errorf(codes.InvalidArgument, "no service account token for audience %q in the volume context: "+
			"the CSIDriver needs tokenRequests with that audience", s.o.Audience)
	}
	tok := tokens[s.o.Audience]
	claims, err := parseClaims(tok.Token)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "the pod's token: %v", err)
	}
	k := claims.Kubernetes
	switch {
	case k.Namespace != w.Namespace || k.ServiceAccount.Name != w.ServiceAccount:
		return nil, status.Error(codes.PermissionDenied, "the pod's token is for another service account")
	case k.Pod.UID != w.PodUID || k.Pod.Name != w.Pod:
		return nil, status.Error(codes.PermissionDenied, "the pod's token is bound to another pod")
	case k.Node.Name != "" && k.Node.Name != s.o.Node:
		return nil, status.Error(codes.PermissionDenied, "the pod's token is bound to another node")
	case k.ServiceAccount.UID == "":
		return nil, status.Error(codes.InvalidArgument, "the pod's token names no service account UID")
	}
	w.ServiceAccountUID = k.ServiceAccount.UID
	if s.o.Kube != nil {
		gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		pod, err := s.o.Kube.CoreV1().Pods(w.Namespace).Get(gctx, w.Pod, metav1.GetOptions{})
		cancel()
		switch {
		case apierrors.IsNotFound(err):
			return nil, status.Error(codes.NotFound, "no such pod")
		case err != nil:
			return nil, status.Errorf(codes.Unavailable, "look the pod up: %v", err)
		}
		if err := checkPod(pod, &w); err != nil {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
	}
	return identity.NewWorkload(w, identity.NewToken(tok.Token), tok.ExpirationTimestamp), nil
}

// checkPod compares the API server's pod with what the kubelet said.
func checkPod(pod *corev1.Pod, w *identity.Workload) error {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	switch {
	case string(pod.UID) != w.PodUID:
		return errors.New("the pod's UID differs from the API server's")
	case pod.Spec.NodeName != w.Node:
		return fmt.Errorf("the pod is scheduled to node %q, not this one", pod.Spec.NodeName)
	case sa != w.ServiceAccount:
		return errors.New("the pod's service account differs from the API server's")
	}
	return nil
}

// claims are the parts of a service account token the plugin checks. The
// token's signature is not checked here: it came from the kubelet, over
// the plugin's root-only socket, and Vault verifies it (TokenReview)
// before it is worth anything.
type claims struct {
	Kubernetes struct {
		Namespace      string `json:"namespace"`
		ServiceAccount struct {
			Name string `json:"name"`
			UID  string `json:"uid"`
		} `json:"serviceaccount"`
		Pod struct {
			Name string `json:"name"`
			UID  string `json:"uid"`
		} `json:"pod"`
		Node struct {
			Name string `json:"name"`
		} `json:"node"`
	} `json:"kubernetes.io"`
}

func parseClaims(jwt string) (*claims, error) {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return nil, errors.New("not a JWT")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, errors.New("not a JWT")
	}
	var c claims
	if err := json.Unmarshal(payload, &c); err != nil {
		return nil, errors.New("not a JWT")
	}
	return &c, nil
}
