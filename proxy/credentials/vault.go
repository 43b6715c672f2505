package credentials

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/credproxy/credproxy/config"
)

// Vault reads a credential from one Vault path. One read returns every field,
// so a database username and password always come from the same lease (the
// mismatch Secretless Broker's issue 1337 describes cannot happen).
//
// Dynamic secrets (database/creds/…, aws/creds/…) carry a lease, which the
// Store renews and revokes through Renew and Revoke. KV secrets carry none:
// fields come from data (KV v1) or data.data (KV v2), and the Store re-reads
// them every RefreshInterval.
type Vault struct {
	c        *VaultClient
	path     string
	fieldMap map[string]string // credproxy field -> Vault field

	mu sync.Mutex
	kv int // 0 unknown, -1 not KV, 1 or 2
	// readPath is path rewritten for KV v2 (<mount>/data/<rest>).
	readPath string

	refresh time.Duration
}

// NewVault builds the source for one secrets.<name>.vault block.
func NewVault(c *VaultClient, s config.VaultSecret) *Vault {
	v := &Vault{c: c, path: strings.Trim(s.Path, "/"), fieldMap: s.FieldMap, kv: s.KVVersion,
		refresh: s.RefreshInterval.D()}
	if v.refresh <= 0 {
		v.refresh = config.DefaultKVRefreshInterval
	}
	return v
}

// RefreshInterval is how often a credential without a lease is re-read.
func (v *Vault) RefreshInterval() time.Duration { return v.refresh }

// Fetch reads the path. Errors name the path and Vault's answer, never a value.
func (v *Vault) Fetch(ctx context.Context) (*Credential, error) {
	path, kv, err := v.resolve(ctx)
	if err != nil {
		return nil, err
	}
	var secret *vault.Secret
	owner, err := v.c.doOwned(ctx, func(ctx context.Context, c *vault.Client) error {
		var err error
		secret, err = c.Logical().ReadWithContext(ctx, path)
		return err
	})
	if err != nil {
		return nil, wrapf(vaultError(err), "vault read %s", path)
	}
	if secret == nil {
		return nil, &Error{Kind: KindNotFound, Msg: fmt.Sprintf("vault read %s: no secret at this path", path)}
	}
	data := secret.Data
	if kv == 2 {
		inner, ok := data["data"].(map[string]any)
		if !ok {
			return nil, fmt.Errorf("vault read %s: KV v2 response without data.data (deleted or destroyed version?)", path)
		}
		data = inner
	}
	fields, err := v.fields(data)
	if err != nil {
		return nil, wrapf(err, "vault read %s", path)
	}
	cred := &Credential{Fields: fields}
	if secret.LeaseID != "" {
		cred.Lease = Lease{
			ID:        secret.LeaseID,
			TTL:       time.Duration(secret.LeaseDuration) * time.Second,
			Renewable: secret.Renewable,
			Issued:    time.Now(),
			Owner:     owner,
		}
	}
	return cred, nil
}

// fields converts Vault data into credential fields, applying field_map.
func (v *Vault) fields(data map[string]any) (map[string]Secret, error) {
	out := make(map[string]Secret, len(data))
	if len(v.fieldMap) > 0 {
		for want, from := range v.fieldMap {
			val, ok := data[from]
			if !ok {
				return nil, fmt.Errorf("field_map: field %q (for %q) is not in the secret (fields: %s)", from, want, strings.Join(sortedKeys(data), ", "))
			}
			out[want] = NewSecret(stringify(val))
		}
		return out, nil
	}
	for k, val := range data {
		out[k] = NewSecret(stringify(val))
	}
	return out, nil
}

// stringify renders a field value: strings as they are, anything else
// (numbers, nested objects) as JSON.
func stringify(v any) string {
	switch t := v.(type) {
	case string:
		return t
	case nil:
		return ""
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

// resolve works out, once, whether the path is on a KV mount and which
// version, by asking Vault what the mount is (as the vault CLI does).
func (v *Vault) resolve(ctx context.Context) (string, int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.readPath != "" {
		return v.readPath, v.kv, nil
	}
	mount := ""
	if v.kv == 0 {
		var secret *vault.Secret
		err := v.c.do(ctx, func(ctx context.Context, c *vault.Client) error {
			var err error
			secret, err = c.Logical().ReadWithContext(ctx, "sys/internal/ui/mounts/"+v.path)
			return err
		})
		switch {
		case err != nil && isPermissionDenied(err):
			// Without access to the mount table, fall back to the path as
			// written; a KV v2 shape is still recognised by kv_version.
			v.kv = -1
		case err != nil:
			return "", 0, wrapf(vaultError(err), "vault: look up the mount of %s", v.path)
		case secret == nil || secret.Data == nil:
			v.kv = -1
		default:
			mount, _ = secret.Data["path"].(string)
			typ, _ := secret.Data["type"].(string)
			v.kv = -1
			if typ == "kv" || typ == "generic" {
				v.kv = 1
				if opts, ok := secret.Data["options"].(map[string]any); ok && fmt.Sprint(opts["version"]) == "2" {
					v.kv = 2
				}
			}
		}
	}
	v.readPath = v.path
	if v.kv == 2 {
		v.readPath = kv2DataPath(v.path, strings.Trim(mount, "/"))
	}
	return v.readPath, v.kv, nil
}

// kv2DataPath inserts "data/" after the mount unless the path already has
// it: secret/github and secret/data/github both read secret/data/github.
func kv2DataPath(path, mount string) string {
	if mount == "" {
		mount, _, _ = strings.Cut(path, "/")
	}
	rest := strings.TrimPrefix(strings.TrimPrefix(path, mount), "/")
	if strings.HasPrefix(rest, "data/") {
		return path
	}
	return mount + "/data/" + rest
}

// Renew extends a lease (sys/leases/renew).
func (v *Vault) Renew(ctx context.Context, lease Lease, increment time.Duration) (Lease, error) {
	var secret *vault.Secret
	err := v.c.do(ctx, func(ctx context.Context, c *vault.Client) error {
		var err error
		secret, err = c.Sys().RenewWithContext(ctx, lease.ID, int(increment.Seconds()))
		return err
	})
	if err != nil {
		return lease, wrapf(vaultError(err, lease.ID), "vault renew lease %s", shortHash(lease))
	}
	if secret == nil {
		return lease, fmt.Errorf("vault renew lease %s: empty response", shortHash(lease))
	}
	out := lease
	out.TTL = time.Duration(secret.LeaseDuration) * time.Second
	out.Renewable = secret.Renewable
	out.Issued = time.Now()
	return out, nil
}

// Revoke ends a lease now (sys/leases/revoke).
func (v *Vault) Revoke(ctx context.Context, lease Lease) error {
	err := v.c.do(ctx, func(ctx context.Context, c *vault.Client) error {
		return c.Sys().RevokeWithContext(ctx, lease.ID)
	})
	if err != nil {
		return wrapf(vaultError(err, lease.ID), "vault revoke lease %s", shortHash(lease))
	}
	return nil
}

// Ready reports whether the client is logged in.
func (v *Vault) Ready() error { return v.c.Ready() }

func shortHash(l Lease) string {
	h := l.IDHash()
	if len(h) > 12 {
		h = h[:12]
	}
	return "sha256:" + h
}
