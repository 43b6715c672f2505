// Package identity is about who is calling and how credproxy proves itself:
// today, the Vault auth methods credproxy logs in with (token, AppRole,
// Kubernetes, JWT).
package identity

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	vault "github.com/hashicorp/vault/api"

	"github.com/credproxy/credproxy/config"
)

// VaultLogin obtains a Vault token. It satisfies vault.AuthMethod, so
// client.Auth().Login(ctx, m) logs in and sets the client's token. Every
// Login re-reads the files it names: Kubernetes and Vault Agent rotate them.
type VaultLogin interface {
	vault.AuthMethod
	// Method is the configured method name, for logs and metrics.
	Method() string
}

// NewVaultLogin builds the login for a vault.auth block. Defaults (mounts,
// the service-account token path) are applied by the config package.
func NewVaultLogin(c config.VaultAuth) (VaultLogin, error) {
	mount := strings.Trim(c.Mount, "/")
	switch c.Method {
	case "", "token":
		return &tokenLogin{file: c.TokenFile}, nil
	case "approle":
		return &appRoleLogin{mount: orDefault(mount, "approle"), roleIDFile: c.RoleIDFile, secretIDFile: c.SecretIDFile}, nil
	case "kubernetes":
		return &jwtLogin{method: "kubernetes", mount: orDefault(mount, "kubernetes"), role: c.Role,
			jwtFile: orDefault(c.JWTFile, config.DefaultKubernetesJWT)}, nil
	case "jwt":
		return &jwtLogin{method: "jwt", mount: orDefault(mount, "jwt"), role: c.Role, jwtFile: c.JWTFile}, nil
	}
	return nil, fmt.Errorf("unknown vault auth method %q", c.Method)
}

func orDefault(v, d string) string {
	if v == "" {
		return d
	}
	return v
}

// readTrimmed reads a one-line credential file.
func readTrimmed(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return v, nil
}

// tokenLogin uses a token given to credproxy: token_file, else $VAULT_TOKEN.
// "Logging in" looks the token up, to learn its TTL and whether it renews.
type tokenLogin struct {
	file string
}

func (*tokenLogin) Method() string { return "token" }

func (l *tokenLogin) Login(ctx context.Context, c *vault.Client) (*vault.Secret, error) {
	token := os.Getenv("VAULT_TOKEN")
	if l.file != "" {
		t, err := readTrimmed(l.file)
		if err != nil {
			return nil, fmt.Errorf("read vault.auth.token_file: %w", err)
		}
		token = t
	}
	if token == "" {
		return nil, errors.New("no Vault token: set vault.auth.token_file or VAULT_TOKEN")
	}
	lc, err := c.Clone()
	if err != nil {
		return nil, err
	}
	lc.SetToken(token)
	s, err := lc.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("look up Vault token: %w", err)
	}
	ttl, _ := s.TokenTTL()
	renewable, _ := s.TokenIsRenewable()
	policies, _ := s.TokenPolicies()
	return &vault.Secret{Auth: &vault.SecretAuth{
		ClientToken:   token,
		LeaseDuration: int(ttl.Seconds()),
		Renewable:     renewable,
		Policies:      policies,
	}}, nil
}

// appRoleLogin logs in with a role id and secret id read from files.
type appRoleLogin struct {
	mount, roleIDFile, secretIDFile string
}

func (*appRoleLogin) Method() string { return "approle" }

func (l *appRoleLogin) Login(ctx context.Context, c *vault.Client) (*vault.Secret, error) {
	roleID, err := readTrimmed(l.roleIDFile)
	if err != nil {
		return nil, fmt.Errorf("read vault.auth.role_id_file: %w", err)
	}
	secretID, err := readTrimmed(l.secretIDFile)
	if err != nil {
		return nil, fmt.Errorf("read vault.auth.secret_id_file: %w", err)
	}
	return loginAt(ctx, c, "auth/"+l.mount+"/login", map[string]any{"role_id": roleID, "secret_id": secretID})
}

// jwtLogin logs in with a signed JWT read from a file: a Kubernetes
// service-account token (method kubernetes) or any OIDC/JWT (method jwt).
type jwtLogin struct {
	method, mount, role, jwtFile string
}

func (l *jwtLogin) Method() string { return l.method }

func (l *jwtLogin) Login(ctx context.Context, c *vault.Client) (*vault.Secret, error) {
	jwt, err := readTrimmed(l.jwtFile)
	if err != nil {
		return nil, fmt.Errorf("read vault.auth.jwt_file: %w", err)
	}
	return loginAt(ctx, c, "auth/"+l.mount+"/login", map[string]any{"role": l.role, "jwt": jwt})
}

// loginAt writes to a login path with a token-less clone of c: a stale token
// must not be sent along with the login.
func loginAt(ctx context.Context, c *vault.Client, path string, body map[string]any) (*vault.Secret, error) {
	lc, err := c.Clone()
	if err != nil {
		return nil, err
	}
	lc.ClearToken()
	s, err := lc.Logical().WriteWithContext(ctx, path, body)
	if err != nil {
		return nil, fmt.Errorf("vault login at %s: %w", path, err)
	}
	if s == nil || s.Auth == nil || s.Auth.ClientToken == "" {
		return nil, fmt.Errorf("vault login at %s: no token in response", path)
	}
	return s, nil
}

// TokenFunc returns the token to log in with, for a login whose token
// lives in memory rather than in a file (a pod's token from the CSI
// node plugin).
type TokenFunc func() (Token, error)

// NewWorkloadLogin builds a kubernetes or jwt login at mount for role,
// with the token tok returns at each login: credproxy logging in as a
// workload, with that pod's own token.
func NewWorkloadLogin(method, mount, role string, tok TokenFunc) (VaultLogin, error) {
	switch method {
	case "kubernetes", "jwt":
	default:
		return nil, fmt.Errorf("workload vault auth: method %q: want kubernetes or jwt", method)
	}
	return &memLogin{method: method, mount: orDefault(strings.Trim(mount, "/"), method), role: role, tok: tok}, nil
}

// memLogin logs in with a JWT held in memory.
type memLogin struct {
	method, mount, role string
	tok                 TokenFunc
}

func (l *memLogin) Method() string { return l.method }

func (l *memLogin) Login(ctx context.Context, c *vault.Client) (*vault.Secret, error) {
	t, err := l.tok()
	if err != nil {
		return nil, err
	}
	if t.IsZero() {
		return nil, errors.New("no workload token")
	}
	return loginAt(ctx, c, "auth/"+l.mount+"/login", map[string]any{"role": l.role, "jwt": t.Reveal()})
}
