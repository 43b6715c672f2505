// Package vaulttest runs an in-process HashiCorp Vault stand-in for
// integration tests: an HTTP server on 127.0.0.1 that speaks the part of
// Vault's HTTP API credproxy uses, with Vault's semantics rather than canned
// answers. Leases expire and are revoked, tokens expire and take their leases
// with them, policies are enforced, and the database secrets engine runs real
// SQL against a real PostgreSQL (see integration/pgtest). Tests written
// against it are meant to pass unchanged against `vault server -dev` (or an
// OpenBao dev server), so paths, request bodies, response envelopes, status
// codes and error texts follow Vault's source and API documentation.
//
//	srv := vaulttest.Start(t, vaulttest.Options{})
//	client := srv.Client(t) // vault/api client holding the root token
//
// # Implemented
//
// HTTP layer: /v1/ paths; GET, LIST (method or ?list=true), PUT and POST
// (both writes), DELETE; GET query parameters become request data as in
// Vault; X-Vault-Token or "Authorization: Bearer"; X-Vault-Namespace is
// accepted (only the root namespace exists). Responses use Vault's envelope
// {request_id, lease_id, renewable, lease_duration, data, wrap_info,
// warnings, auth, mount_type}, 204 for empty writes, 404 {"errors":[]} for
// missing reads and empty lists, and {"errors":[...]} with Vault's codes and
// texts: 400 bad request, 403 permission denied ("permission denied" without
// a token, "2 errors occurred: permission denied, invalid token" for an
// unknown or expired token, "1 error occurred: permission denied" when a
// policy denies), 404 unsupported path / no handler for route, 405
// unsupported operation, 500 "1 error occurred: ..." for backend failures.
// The sys routes Vault injects into the top level (sys/mounts, sys/auth,
// sys/audit, sys/policy, sys/capabilities*) are injected too.
//
// System: sys/health (GET, HEAD, status-code query parameters),
// sys/seal-status;
// sys/mounts[/<path>] (kv with options.version 1|2, kv-v2, database; mount
// config default_lease_ttl/max_lease_ttl); sys/auth[/<path>] (approle, jwt,
// oidc, kubernetes); sys/policies/acl[/<name>] and the legacy sys/policy;
// sys/capabilities-self; sys/internal/ui/mounts[/<path>] (what the CLI uses
// to detect KV v2); sys/audit[/<name>] (type file, options file_path,
// log_raw, hmac_accessor) and sys/audit-hash/<name>; sys/leases/lookup,
// renew, revoke (sync and async), revoke-prefix, revoke-force, and the old
// sys/renew and sys/revoke aliases.
//
// Policies: HCL (or JSON) parsed with hashicorp/hcl as Vault does; path
// rules with a trailing * glob and + segment wildcards, the legacy policy =
// "read"/"write"/"sudo"/"deny" form, capabilities create, read, update,
// delete, list, patch, sudo, deny. Rules for one path are merged across a
// token's policies (deny wins), and the most specific matching rule decides,
// by Vault's priority rules. Writes are create or update by existence check,
// as in Vault; root-protected paths (sys/auth/*, sys/audit/*,
// sys/leases/revoke-prefix/*, ...) need sudo. The root policy bypasses all
// checks; "default" is Vault's built-in default policy and is attached to
// tokens unless no_default_policy / token_no_default_policy is set.
//
// Leases: IDs <request path>/<24 base62 chars>; TTLs follow
// framework.CalculateTTL: a renewal asks for increment seconds from now (0 or
// absent: the backend's TTL, i.e. the role's default_ttl), is capped so the
// lease never outlives issue time + max TTL (with Vault's "TTL of ... exceeded
// the effective max_ttl of ...; TTL value is capped accordingly" warning),
// and non-renewable or expired leases refuse with "lease is not renewable",
// "lease expired" or "lease not found". A background loop revokes leases when
// they expire (retrying failures with Vault's exponential backoff, 6 attempts)
// and revokes tokens when they expire. Revoking or expiring a token revokes
// its child tokens and, lazily as Vault does, every lease created with it.
//
// Tokens: the root token, auth/token/create (policies, ttl,
// explicit_max_ttl, period, renewable, num_uses, no_parent, no_default_policy,
// meta, display_name, id), create-orphan, lookup, lookup-self, renew,
// renew-self (increment, capped by max TTL and explicit_max_ttl),
// revoke, revoke-self. Tokens look like Vault's (hvs. + 24 base62 chars) and
// their display names follow Vault ("root", "token", "approle",
// "jwt-<user claim>", "kubernetes-<namespace>-<service account>").
// num_uses is enforced and a used-up token is revoked with its leases.
//
// KV: version 1 (read/write/delete/list; reads report the mount's default
// lease TTL and no lease, as Vault does) and version 2 (data/, metadata/,
// delete/, undelete/, destroy/, config; versions, check-and-set, soft delete
// answering 404 with the metadata, and the "Invalid path for a versioned K/V
// secrets engine" 404 for v1-style paths).
//
// Database: config/<name> (postgresql-database-plugin; connection_url with
// {{username}}/{{password}}, username, password, allowed_roles with globs,
// verify_connection, username_template, disable_escaping; other connection
// fields are stored and returned but have no effect),
// roles/<name> (db_name, creation/revocation/renew/rollback statements as a
// list or a string, default_ttl, max_ttl in seconds or duration strings),
// creds/<role>, reset/<name>. Statements are split and rendered as the
// postgres plugin does ({{name}}, {{username}}, {{password}},
// {{expiration}} in "2006-01-02 15:04:05-0700"), usernames follow the
// plugin's default template v-<display name:8>-<role:8>-<20 random>-<unix>
// truncated to 63, passwords Vault's default policy (20 characters with a
// lower, upper, digit and dash). Renewal runs renew_statements (default:
// ALTER ROLE ... VALID UNTIL), revocation runs revocation_statements or the
// plugin's default revoke-and-DROP ROLE, so roles vanish from pg_roles.
//
// Auth methods (any mount path): AppRole (role, role-id, secret-id,
// custom-secret-id, login; secret_id_ttl and secret_id_num_uses), JWT
// (config with jwt_validation_pubkeys and bound_issuer, role with role_type
// jwt, bound_audiences, bound_subject, bound_claims, user_claim,
// claim_mappings, leeways; login verifying RS/ES/PS/EdDSA signatures, exp,
// nbf, iat, aud, iss, with the plugin's error texts) and Kubernetes (see
// below). Login tokens get the role's token_* parameters and renew against
// the role, as the plugins do.
//
// Audit: the file device writes one JSON object per line, a "request" entry
// before and a "response" entry after each request, shaped like Vault's
// (time, type, auth, request{id, operation, path, mount_point, mount_type,
// client_token, data, remote_address, ...}, response{secret{lease_id}, data,
// auth, ...}, error). Tokens, accessors and every string value in request
// and response data are HMAC-SHA256'd with a per-device salt and written as
// "hmac-sha256:<hex>", which sys/audit-hash reproduces.
//
// Test hooks (Go API): Start, Addr, URL, RootToken, Client (a vault/api
// client with the root token and retries off), Count (HTTP requests received
// per logical path, failed ones included), Leases (lease IDs under a
// prefix), Stop (listener and connections closed: clients get "connection
// refused"; leases do not expire while stopped, as a stopped Vault revokes
// nothing), Restart (same state, same port; overdue leases are revoked at
// once, as Vault does when it restores leases), Close (registered with
// t.Cleanup). NewSigner and NewECSigner mint JWTs (RS256, ES256) whose
// PublicKeyPEM goes into jwt_validation_pubkeys or pem_keys; JWTClaims and
// KubernetesClaims build typical claim sets.
//
// # Known differences from Vault
//
//   - Storage is in memory: no seal/unseal, no HA, no replication, no
//     namespaces beyond root, no response wrapping, no identity store
//     (entity_id is empty, no identity policies, no policy templating),
//     no cubbyhole or identity mounts, no plugin catalog.
//   - Kubernetes auth reviews a login JWT as the plugin does: with the
//     TokenReview API at kubernetes_host (trusting kubernetes_ca_cert,
//     authenticated with token_reviewer_jwt or else the login JWT itself),
//     for the role's audience, then binds the reviewed service account to
//     the role's names and namespaces (integration/kubetest runs a real
//     API server for it). With the config field pem_keys set it verifies
//     the signature offline instead and never contacts kubernetes_host.
//     Alias names, disable_local_ca_jwt and the local CA/JWT files of a
//     pod are not implemented.
//   - JWT auth supports jwt_validation_pubkeys only (no OIDC discovery or
//     JWKS URL, no OIDC flows, no groups).
//   - Only the postgresql-database-plugin exists; static roles, root
//     rotation and password policies are not implemented.
//   - Policy allowed/denied/required_parameters, wrapping TTLs, control
//     groups and Sentinel are parsed but not enforced; batch tokens and
//     token roles are not implemented.
//   - Response wrapping (X-Vault-Wrap-TTL) is refused with a 400 rather
//     than ignored. Token IDs are "hvs." and 24 characters, shorter than
//     Vault's current format.
//   - Exact error texts follow current Vault sources; they differ in places
//     between Vault versions, so tests should match on the status code and
//     the distinctive part of the text.
package vaulttest
