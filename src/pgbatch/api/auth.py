"""Bearer API tokens, stored hashed, each bound to a tenant."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

from pgbatch.errors import ConfigurationError

__all__ = ["TokenTable", "hash_token", "is_loopback", "new_token"]

# A token is this many random bytes, URL-safe base64: guessing is hopeless, so a fast
# hash (not a password hash) is the right way to keep it at rest.
TOKEN_BYTES = 32
DEFAULT_TENANT = "default"


def hash_token(token: str) -> str:
    """Return the SHA-256 hex digest under which a token is configured."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(tenant: str) -> tuple[str, str]:
    """Return a new token and its `PGBATCH_API_TOKENS` entry for `tenant`."""
    _check_tenant(tenant)
    token = "pgb_" + secrets.token_urlsafe(TOKEN_BYTES)
    return token, f"{tenant}:sha256:{hash_token(token)}"


def _check_tenant(tenant: str) -> None:
    if not tenant or not all(c.isalnum() or c in "-_." for c in tenant):
        raise ConfigurationError(
            f"tenant names use letters, digits, '-', '_' and '.', got {tenant!r}"
        )


@dataclass(frozen=True, slots=True)
class TokenTable:
    """The configured tokens: digest → tenant. Empty means authentication is off."""

    tenants_by_digest: dict[str, str]

    @classmethod
    def parse(cls, spec: str | None) -> TokenTable:
        """Parse `tenant:sha256:<hex>[,…]`; raise ConfigurationError naming a bad entry."""
        table: dict[str, str] = {}
        for raw in (spec or "").split(","):
            entry = raw.strip()
            if not entry:
                continue
            tenant, algorithm, digest = [*entry.split(":"), "", ""][:3]
            digest = digest.lower()
            if algorithm != "sha256" or len(digest) != 64 or not _is_hex(digest):
                raise ConfigurationError(
                    f"PGBATCH_API_TOKENS entry {entry[:24]!r}… must be tenant:sha256:<64 hex "
                    "digits> (`pgbatch token new TENANT` prints one)"
                )
            _check_tenant(tenant)
            table[digest] = tenant
        return cls(table)

    @property
    def enabled(self) -> bool:
        """Tell whether requests must carry a token."""
        return bool(self.tenants_by_digest)

    def tenant_of(self, token: str) -> str | None:
        """Return the tenant of a presented token, or None if it is unknown."""
        # A lookup by digest: lookup timing could only tell an attacker about the SHA-256
        # of their own guess, never about a configured token.
        return self.tenants_by_digest.get(hash_token(token))


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Tell whether binding to `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
