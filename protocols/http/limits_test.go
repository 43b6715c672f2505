package httpproxy

import "fmt"

func (o *countingObserver) Refused(route, reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.seen = append(o.seen, fmt.Sprintf("refused %s %s", route, reason))
}

func (o *countingObserver) TimedOut(route, kind string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.seen = append(o.seen, fmt.Sprintf("timeout %s %s", route, kind))
}
