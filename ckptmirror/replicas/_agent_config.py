"""The peer agent's options that can be wrong: :class:`AgentConfigError` and the per-namespace tokens.

Apart from the agent's state so that option parsing (``ckptmirror serve``'s ``--namespace-token``)
and its usage error need neither aiohttp nor an agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ManifestError
from . import _peer_protocol as wire
from .base import validate_key

__all__ = ["AgentConfigError", "NamespaceToken", "parse_namespace_tokens"]


class AgentConfigError(ValueError):
    """The agent cannot start with these options (a usage error: ``ckptmirror serve`` exits 2).

    The message names the command-line option to fix.
    """


@dataclass(frozen=True)
class NamespaceToken:
    """A token valid only on the namespace ``prefix`` and the namespaces under it."""

    prefix: tuple[str, ...]  # the prefix's segments: "jobs/a" covers "jobs/a" and "jobs/a/x", not "jobs/ab"
    token: bytes

    def covers(self, namespace: str) -> bool:
        """Whether ``namespace`` is ``prefix`` or under it (compared segment by segment)."""
        return tuple(namespace.split("/")[: len(self.prefix)]) == self.prefix


def parse_namespace_tokens(tokens: Mapping[str, str] | None) -> tuple[NamespaceToken, ...]:
    """Validated :class:`NamespaceToken` objects from ``{prefix: token}``; AgentConfigError if not valid."""
    out = []
    for prefix, token in (tokens or {}).items():
        clean = prefix.strip("/")
        try:
            validate_key(clean, "--namespace-token")
        except ManifestError:
            raise AgentConfigError(
                f"--namespace-token {prefix!r}: not a namespace prefix (segments of letters, digits, '.', '_', '-')"
            ) from None
        why = wire.refused_name(clean)
        if why:
            raise AgentConfigError(f"--namespace-token {prefix!r}: {why}")
        if not token or not token.strip():
            raise AgentConfigError(f"--namespace-token {prefix!r}: the token is empty")
        out.append(NamespaceToken(tuple(clean.split("/")), token.strip().encode()))
    return tuple(out)
