package csi

import (
	"context"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
)

// watchPods withdraws published pods that the API server no longer has on
// this node: deleted (gone, or terminal), even if the kubelet never
// unpublishes their volumes. It lists and watches only this node's pods
// (a field selector on spec.nodeName), relisting after every break.
func (s *Server) watchPods(ctx context.Context) {
	sel := fields.OneTermEqualSelector("spec.nodeName", s.o.Node).String()
	pods := s.o.Kube.CoreV1().Pods("")
	backoff := time.Second
	for ctx.Err() == nil {
		list, err := pods.List(ctx, metav1.ListOptions{FieldSelector: sel})
		if err == nil {
			live := map[string]bool{}
			for i := range list.Items {
				if !terminal(&list.Items[i]) {
					live[string(list.Items[i].UID)] = true
				}
			}
			for _, uid := range s.published() {
				if !live[uid] {
					s.log.Info("published pod is gone from the API server; withdrawing it", zap.String("pod_uid", uid))
					s.podGone(uid)
				}
			}
			var w watch.Interface
			w, err = pods.Watch(ctx, metav1.ListOptions{FieldSelector: sel, ResourceVersion: list.ResourceVersion})
			if err == nil {
				backoff = time.Second
				if s.hookWatching != nil {
					s.hookWatching()
				}
				s.follow(ctx, w)
				w.Stop()
				continue
			}
		}
		if ctx.Err() != nil {
			return
		}
		s.log.Warn("watch this node's pods", zap.Error(err), zap.Duration("retry_in", backoff))
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, time.Minute)
	}
}

// follow handles watch events until the watch ends.
func (s *Server) follow(ctx context.Context, w watch.Interface) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.ResultChan():
			if !ok {
				return
			}
			pod, isPod := ev.Object.(*corev1.Pod)
			if !isPod {
				if ev.Type == watch.Error {
					return // relist
				}
				continue
			}
			if ev.Type == watch.Deleted || terminal(pod) {
				s.podGone(string(pod.UID))
			}
		}
	}
}

// terminal reports whether a pod's containers will not run again.
func terminal(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// published lists the published pods' UIDs.
func (s *Server) published() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.pods))
	for uid := range s.pods {
		out = append(out, uid)
	}
	return out
}
