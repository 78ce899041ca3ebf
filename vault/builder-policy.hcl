# Vault policy for a homelab-deploy builder: read its NKey seed and nothing else.
# Write it with: vault policy write homelab-deploy-builder vault/builder-policy.hcl
# The test suite loads this very file into a real Vault-API server (tests/e2e/vault.rs).

# The seed on a KV version 1 mount named "shared".
path "shared/homelab-deploy/builder-nkey" {
  capabilities = ["read"]
}

# The same secret on a KV version 2 mount named "shared" (reads go through "data/").
path "shared/data/homelab-deploy/builder-nkey" {
  capabilities = ["read"]
}
