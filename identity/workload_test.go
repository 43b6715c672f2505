package identity

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// TestTokenNeverPrints: the pod's token shows as REDACTED in fmt, JSON and
// zap, alone or inside a Workload.
func TestTokenNeverPrints(t *testing.T) {
	const secret = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.sig"
	tok := NewToken(secret)
	w := NewWorkload(Workload{Namespace: "ns", Pod: "p", PodUID: "u", ServiceAccount: "sa"}, tok, time.Now())
	var out bytes.Buffer
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%d"} {
		fmt.Fprintf(&out, verb+"\n", tok)
		fmt.Fprintf(&out, verb+"\n", *w)
		fmt.Fprintf(&out, verb+"\n", w)
	}
	b, _ := json.Marshal(map[string]any{"t": tok, "w": w})
	out.Write(b)
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(&out), zap.DebugLevel))
	log.Info("x", zap.Any("token", tok), zap.Object("workload", w), zap.Any("w", w))
	if strings.Contains(out.String(), secret) || strings.Contains(out.String(), "c2VjcmV0") {
		t.Fatalf("the token leaked:\n%s", out.String())
	}
	if got, _ := w.Token().Get(); got.Reveal() != secret {
		t.Error("Reveal lost the token")
	}
}
