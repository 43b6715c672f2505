package vaulttest

import (
	"maps"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// listChildren lists the keys one level below prefix, folders with a
// trailing slash, as a storage List does.
func listChildren(keys []string, prefix string) []string {
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	seen := map[string]bool{}
	out := []string{}
	for _, k := range keys {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok || rest == "" {
			continue
		}
		if i := strings.Index(rest, "/"); i >= 0 {
			rest = rest[:i+1]
		}
		if !seen[rest] {
			seen[rest] = true
			out = append(out, rest)
		}
	}
	sort.Strings(out)
	return out
}

// kvV1 is the unversioned KV engine (Vault's passthrough backend).
type kvV1 struct {
	mu   sync.Mutex
	data map[string]map[string]any
}

func newKVv1() *kvV1 { return &kvV1{data: map[string]map[string]any{}} }

func (kv *kvV1) routes() []*route {
	rt := newRoute(`(?P<path>.*)`, map[op]handler{opRead: kv.read, opUpdate: kv.write, opDelete: kv.delete, opList: kv.list})
	rt.exists = func(r *request) bool {
		kv.mu.Lock()
		defer kv.mu.Unlock()
		_, ok := kv.data[r.vars["path"]]
		return ok
	}
	return []*route{rt}
}

// read returns the stored data with the mount's default lease TTL (or the
// secret's "ttl" key) as lease_duration and no lease, as Vault's KV does.
func (kv *kvV1) read(r *request) (*response, error) {
	kv.mu.Lock()
	d, ok := kv.data[r.vars["path"]]
	d = maps.Clone(d)
	kv.mu.Unlock()
	if !ok {
		return nil, nil
	}
	sec := &secretSpec{noLease: true}
	for _, k := range []string{"ttl", "lease"} {
		if v, ok := d[k]; ok {
			if ttl, err := parseDurationSecond(v); err == nil {
				sec.ttl = ttl
			}
			break
		}
	}
	return &response{data: d, secret: sec}, nil
}

func (kv *kvV1) write(r *request) (*response, error) {
	p := r.vars["path"]
	if p == "" {
		return nil, badRequest("missing path")
	}
	if len(r.data) == 0 {
		return nil, badRequest("missing data fields")
	}
	kv.mu.Lock()
	kv.data[p] = maps.Clone(map[string]any(r.data))
	kv.mu.Unlock()
	return nil, nil
}

func (kv *kvV1) delete(r *request) (*response, error) {
	kv.mu.Lock()
	delete(kv.data, r.vars["path"])
	kv.mu.Unlock()
	return nil, nil
}

func (kv *kvV1) list(r *request) (*response, error) {
	kv.mu.Lock()
	keys := make([]string, 0, len(kv.data))
	for k := range kv.data {
		keys = append(keys, k)
	}
	kv.mu.Unlock()
	return listResponse(listChildren(keys, r.vars["path"])), nil
}

// kvV2 is the versioned KV engine (vault-plugin-secrets-kv).
type kvV2 struct {
	mu                 sync.Mutex
	keys               map[string]*kvKey
	maxVersions        int
	casRequired        bool
	deleteVersionAfter time.Duration
}

type kvKey struct {
	versions       map[int]*kvVersion
	current        int
	oldest         int
	created        time.Time
	updated        time.Time
	maxVersions    int
	casRequired    bool
	customMetadata map[string]string
}

type kvVersion struct {
	data      map[string]any
	created   time.Time
	deletion  time.Time
	destroyed bool
}

func newKVv2() *kvV2 { return &kvV2{keys: map[string]*kvKey{}} }

// kvTime renders a time as ptypesTimestampToString: RFC 3339 in UTC with
// nanoseconds, "" for none.
func kvTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func (kv *kvV2) routes() []*route {
	exists := func(r *request) bool {
		kv.mu.Lock()
		defer kv.mu.Unlock()
		return kv.keys[r.vars["path"]] != nil
	}
	data := newRoute(`data/(?P<path>.*?[^/])`, map[op]handler{opRead: kv.readData, opUpdate: kv.writeData, opDelete: kv.deleteLatest})
	data.exists = exists
	meta := newRoute(`metadata(/(?P<path>.*))?`, map[op]handler{opRead: kv.readMeta, opUpdate: kv.writeMeta, opDelete: kv.deleteMeta, opList: kv.listMeta})
	meta.exists = exists
	return []*route{
		newRoute(`config`, map[op]handler{opRead: kv.readConfig, opUpdate: kv.writeConfig}),
		data,
		meta,
		newRoute(`delete/(?P<path>.*?[^/])`, map[op]handler{opUpdate: kv.versionsOp(kv.softDelete)}),
		newRoute(`undelete/(?P<path>.*?[^/])`, map[op]handler{opUpdate: kv.versionsOp(kv.undelete)}),
		newRoute(`destroy/(?P<path>.*?[^/])`, map[op]handler{opUpdate: kv.versionsOp(kv.destroy)}),
		newRoute(`(?P<path>.*)`, map[op]handler{opRead: kv.invalidPath("get"), opList: kv.invalidPath("list"),
			opUpdate: kv.invalidPath("put"), opDelete: kv.invalidPath("delete")}),
	}
}

// invalidPath is what a v2 mount answers for a v1-style path: a 404 with a
// warning and no data.
func (kv *kvV2) invalidPath(verb string) handler {
	return func(r *request) (*response, error) {
		return &response{status: http.StatusNotFound, noMountType: true, warnings: []string{
			"Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints to use. If using the Vault CLI, use 'vault kv " + verb + "' for this operation.",
		}}, nil
	}
}

func (kv *kvV2) readConfig(r *request) (*response, error) {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	return &response{data: map[string]any{
		"max_versions":         kv.maxVersions,
		"cas_required":         kv.casRequired,
		"delete_version_after": kv.deleteVersionAfter.String(),
	}}, nil
}

func (kv *kvV2) writeConfig(r *request) (*response, error) {
	maxVersions, err := r.data.integer("max_versions")
	if err != nil {
		return nil, err
	}
	cas, err := r.data.boolean("cas_required", false)
	if err != nil {
		return nil, err
	}
	dva, err := r.data.duration("delete_version_after")
	if err != nil {
		return nil, err
	}
	kv.mu.Lock()
	defer kv.mu.Unlock()
	if r.data.has("max_versions") {
		kv.maxVersions = maxVersions
	}
	if r.data.has("cas_required") {
		kv.casRequired = cas
	}
	if r.data.has("delete_version_after") {
		kv.deleteVersionAfter = dva
	}
	return nil, nil
}

func (kv *kvV2) versionMeta(k *kvKey, n int) map[string]any {
	v := k.versions[n]
	return map[string]any{
		"version":         n,
		"created_time":    kvTime(v.created),
		"deletion_time":   kvTime(v.deletion),
		"destroyed":       v.destroyed,
		"custom_metadata": k.customMetadata,
	}
}

// readData is pathDataRead: the current (or ?version=) version; a deleted
// or destroyed one is a 404 that still carries its metadata.
func (kv *kvV2) readData(r *request) (*response, error) {
	want, err := r.data.integer("version")
	if err != nil {
		return nil, err
	}
	kv.mu.Lock()
	defer kv.mu.Unlock()
	k := kv.keys[r.vars["path"]]
	if k == nil {
		return nil, nil
	}
	n := k.current
	if want > 0 {
		n = want
	}
	v := k.versions[n]
	if v == nil {
		return nil, nil
	}
	resp := &response{data: map[string]any{"data": nil, "metadata": kv.versionMeta(k, n)}}
	if (!v.deletion.IsZero() && v.deletion.Before(time.Now())) || v.destroyed {
		resp.status = http.StatusNotFound
		resp.noMountType = true
		return resp, nil
	}
	resp.data["data"] = maps.Clone(v.data)
	return resp, nil
}

// writeData is pathDataWrite: a new version, with check-and-set.
func (kv *kvV2) writeData(r *request) (*response, error) {
	p := r.vars["path"]
	data, err := r.data.object("data")
	if err != nil {
		return nil, err
	}
	if data == nil {
		return nil, badRequest("no data provided")
	}
	opts, err := r.data.object("options")
	if err != nil {
		return nil, err
	}
	kv.mu.Lock()
	defer kv.mu.Unlock()
	k := kv.keys[p]
	if k == nil {
		k = &kvKey{versions: map[int]*kvVersion{}}
	}
	if casRaw, ok := opts["cas"]; ok {
		cas, err := (fields{"cas": casRaw}).integer("cas")
		if err != nil {
			return nil, badRequest("error parsing check-and-set parameter")
		}
		if cas != k.current {
			return nil, badRequest("check-and-set parameter did not match the current version")
		}
	} else if kv.casRequired || k.casRequired {
		return nil, badRequest("check-and-set parameter required for this call")
	}
	now := time.Now()
	v := &kvVersion{data: maps.Clone(data), created: now}
	if dva := kv.deleteVersionAfter; dva > 0 {
		v.deletion = now.Add(dva)
	}
	if k.created.IsZero() {
		k.created = now
		k.oldest = 1
	}
	k.current++
	k.updated = now
	k.versions[k.current] = v
	kv.keys[p] = k
	kv.pruneLocked(k)
	return &response{data: kv.versionMeta(k, k.current)}, nil
}

// pruneLocked drops versions beyond max_versions (key's, else engine's,
// else 10).
func (kv *kvV2) pruneLocked(k *kvKey) {
	limit := k.maxVersions
	if limit == 0 {
		limit = kv.maxVersions
	}
	if limit == 0 {
		limit = 10
	}
	for k.current-k.oldest+1 > limit {
		delete(k.versions, k.oldest)
		k.oldest++
	}
}

func (kv *kvV2) deleteLatest(r *request) (*response, error) {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	k := kv.keys[r.vars["path"]]
	if k == nil {
		return nil, nil
	}
	if v := k.versions[k.current]; v != nil && v.deletion.IsZero() && !v.destroyed {
		v.deletion = time.Now()
	}
	return nil, nil
}

// versionsOp applies fn to the versions listed in the request.
func (kv *kvV2) versionsOp(fn func(v *kvVersion)) handler {
	return func(r *request) (*response, error) {
		raw, ok := r.data["versions"]
		if !ok {
			return nil, badRequest("no version number provided")
		}
		var nums []int
		switch x := raw.(type) {
		case []any:
			for _, e := range x {
				n, err := (fields{"versions": e}).integer("versions")
				if err != nil {
					return nil, err
				}
				nums = append(nums, n)
			}
		default:
			str, err := (fields{"versions": raw}).str("versions")
			if err != nil {
				return nil, err
			}
			for _, part := range strings.Split(strings.Trim(strings.TrimSpace(str), "[]"), ",") {
				n, err := strconv.Atoi(strings.TrimSpace(part))
				if err != nil {
					return nil, badRequest("error converting input %v for field \"versions\": %s", raw, err)
				}
				nums = append(nums, n)
			}
		}
		kv.mu.Lock()
		defer kv.mu.Unlock()
		k := kv.keys[r.vars["path"]]
		if k == nil {
			return nil, nil
		}
		for _, n := range nums {
			if v := k.versions[n]; v != nil {
				fn(v)
			}
		}
		return nil, nil
	}
}

func (kv *kvV2) softDelete(v *kvVersion) {
	if v.deletion.IsZero() || v.deletion.After(time.Now()) {
		v.deletion = time.Now()
	}
}

func (kv *kvV2) undelete(v *kvVersion) {
	if !v.destroyed {
		v.deletion = time.Time{}
	}
}

func (kv *kvV2) destroy(v *kvVersion) {
	v.destroyed = true
	v.data = nil
}

func (kv *kvV2) readMeta(r *request) (*response, error) {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	k := kv.keys[r.vars["path"]]
	if k == nil {
		return nil, nil
	}
	versions := map[string]any{}
	for n, v := range k.versions {
		versions[strconv.Itoa(n)] = map[string]any{
			"created_time":  kvTime(v.created),
			"deletion_time": kvTime(v.deletion),
			"destroyed":     v.destroyed,
		}
	}
	return &response{data: map[string]any{
		"versions":             versions,
		"current_version":      k.current,
		"oldest_version":       k.oldest,
		"created_time":         kvTime(k.created),
		"updated_time":         kvTime(k.updated),
		"max_versions":         k.maxVersions,
		"cas_required":         k.casRequired,
		"delete_version_after": "0s",
		"custom_metadata":      k.customMetadata,
	}}, nil
}

func (kv *kvV2) writeMeta(r *request) (*response, error) {
	p := r.vars["path"]
	if p == "" {
		return nil, badRequest("missing path")
	}
	maxVersions, err := r.data.integer("max_versions")
	if err != nil {
		return nil, err
	}
	cas, err := r.data.boolean("cas_required", false)
	if err != nil {
		return nil, err
	}
	custom, err := r.data.stringMap("custom_metadata")
	if err != nil {
		return nil, err
	}
	kv.mu.Lock()
	defer kv.mu.Unlock()
	k := kv.keys[p]
	if k == nil {
		now := time.Now()
		k = &kvKey{versions: map[int]*kvVersion{}, created: now, updated: now}
		kv.keys[p] = k
	}
	if r.data.has("max_versions") {
		k.maxVersions = maxVersions
	}
	if r.data.has("cas_required") {
		k.casRequired = cas
	}
	if r.data.has("custom_metadata") {
		k.customMetadata = custom
	}
	return nil, nil
}

func (kv *kvV2) deleteMeta(r *request) (*response, error) {
	kv.mu.Lock()
	delete(kv.keys, r.vars["path"])
	kv.mu.Unlock()
	return nil, nil
}

func (kv *kvV2) listMeta(r *request) (*response, error) {
	kv.mu.Lock()
	keys := make([]string, 0, len(kv.keys))
	for k := range kv.keys {
		keys = append(keys, k)
	}
	kv.mu.Unlock()
	return listResponse(listChildren(keys, r.vars["path"])), nil
}
