package main

import "testing"

func TestChooseMaxProcs(t *testing.T) {
	for _, tc := range []struct {
		env      string
		quota    float64
		hasQuota bool
		want     int
		why      string
	}{
		{"", 0, false, 0, maxProcsRuntime},   // no limit: the runtime's CPUs
		{"", 0.1, true, 1, maxProcsOneCPU},   // a 100m sidecar
		{"", 0.5, true, 1, maxProcsOneCPU},   // 500m
		{"", 1, true, 1, maxProcsOneCPU},     // exactly one CPU
		{"", 1.5, true, 0, maxProcsRuntime},  // the runtime rounds up: 2
		{"", 4, true, 0, maxProcsRuntime},    // and follows later changes
		{"3", 0.5, true, 0, maxProcsFromEnv}, // the operator's word wins
		{"1", 0, false, 0, maxProcsFromEnv},  // even without a limit
	} {
		got, why := chooseMaxProcs(tc.env, tc.quota, tc.hasQuota)
		if got != tc.want || why != tc.why {
			t.Errorf("chooseMaxProcs(%q, %v, %v) = %d, %q; want %d, %q", tc.env, tc.quota, tc.hasQuota, got, why, tc.want, tc.why)
		}
	}
}
