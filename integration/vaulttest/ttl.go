package vaulttest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// sysView is what a backend sees of its mount's lease settings
// (logical.SystemView's DefaultLeaseTTL and MaxLeaseTTL).
type sysView struct {
	defaultTTL, maxTTL time.Duration
}

// calculateTTL is Vault's framework.CalculateTTL: the TTL for a new lease
// or a renewal. increment is what a renewal asks for, backendTTL the
// backend's TTL (a role's default_ttl), period a periodic token's period,
// and the effective max is the least of the mount max, backendMaxTTL and
// explicitMaxTTL. A lease never outlives startTime (its issue time) plus
// that max; a TTL capped to stay within it comes with Vault's warning.
// Times are truncated to the second, as in Vault.
func calculateTTL(sv sysView, increment, backendTTL, period, backendMaxTTL, explicitMaxTTL time.Duration, startTime time.Time) (time.Duration, []string, error) {
	now := time.Now().Truncate(time.Second)
	if startTime.IsZero() {
		startTime = now
	} else {
		startTime = startTime.Truncate(time.Second)
	}
	maxTTL := sv.maxTTL
	if backendMaxTTL > 0 && backendMaxTTL < maxTTL {
		maxTTL = backendMaxTTL
	}
	if explicitMaxTTL > 0 && explicitMaxTTL < maxTTL {
		maxTTL = explicitMaxTTL
	}
	if maxTTL <= 0 {
		return 0, nil, errors.New("max TTL must be greater than zero")
	}

	var ttl time.Duration
	var warnings []string
	var maxValidTime time.Time
	switch {
	case period > 0:
		if period > maxTTL {
			warnings = append(warnings, fmt.Sprintf("period of %q exceeded the effective max_ttl of %q; period value is capped accordingly",
				humanDuration(period), humanDuration(maxTTL)))
			period = maxTTL
		}
		ttl = period
		if explicitMaxTTL > 0 {
			maxValidTime = startTime.Add(explicitMaxTTL)
		}
	default:
		switch {
		case increment > 0:
			ttl = increment
		case backendTTL > 0:
			ttl = backendTTL
		default:
			ttl = sv.defaultTTL
		}
		maxValidTime = startTime.Add(maxTTL)
	}

	if !maxValidTime.IsZero() {
		maxValidTTL := maxValidTime.Sub(now)
		if maxValidTTL <= 0 {
			return 0, nil, errors.New("past the max TTL, cannot renew")
		}
		if maxValidTTL-ttl < 0 {
			warnings = append(warnings, fmt.Sprintf("TTL of %q exceeded the effective max_ttl of %q; TTL value is capped accordingly",
				humanDuration(ttl), humanDuration(maxValidTTL)))
			ttl = maxValidTTL
		}
	}
	return ttl, warnings, nil
}

// humanDuration prints a duration without zero units ("1h", "90s" → "1m30s"),
// as Vault's framework does in TTL warnings.
func humanDuration(d time.Duration) string {
	if d == 0 {
		return "0s"
	}
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if i := strings.Index(s, "h0m"); i > 0 {
		s = s[:i+1] + s[i+3:]
	}
	return s
}

const base62Chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// randomString returns n characters drawn uniformly from charset with
// crypto/rand (rejection sampling, so without modulo bias).
func randomString(n int, charset string) string {
	out := make([]byte, 0, n)
	buf := make([]byte, 2*n)
	limit := 256 - 256%len(charset)
	for len(out) < n {
		rand.Read(buf) // never fails: crypto/rand aborts the program instead
		for _, b := range buf {
			if int(b) < limit && len(out) < n {
				out = append(out, charset[int(b)%len(charset)])
			}
		}
	}
	return string(out)
}

// base62 is Vault's base62.Random: lease IDs, token IDs, accessors.
func base62(n int) string { return randomString(n, base62Chars) }

// newUUID returns a random (version 4) UUID, as go-uuid.GenerateUUID.
func newUUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func randomHex(n int) string {
	b := make([]byte, (n+1)/2)
	rand.Read(b)
	return hex.EncodeToString(b)[:n]
}
