"""Small facts about the wire shared by the unary and the streaming paths."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

try:  # what grpc.aio raises when writing to a client connection that is gone
    from grpc._cython.cygrpc import ExecuteBatchError
except ImportError:  # pragma: no cover - a grpcio without it raises the errors below
    class ExecuteBatchError(Exception):  # type: ignore[no-redef]
        """Never raised: stands in for grpcio's private class."""

# Failures of the instance or of the path to it: they count towards ejection and may be
# retried on another instance (before any response reached the client).
TRANSPORT_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE})
# Transport-level headers that gRPC sets itself on each hop.
DROPPED_METADATA = ("grpc-", ":", "user-agent")


def forward_metadata(metadata: Sequence[tuple[str, str | bytes]]
                     ) -> tuple[tuple[str, str | bytes], ...] | None:
    """The client's metadata to send on to the instance (None when there is none)."""
    kept = tuple((k, v) for k, v in metadata if not k.startswith(DROPPED_METADATA))
    return kept or None
