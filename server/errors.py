"""Domain errors of the coordinator. Each names the gRPC status the servicer maps it to,
so the round logic stays free of grpc and the mapping lives in one table."""

from __future__ import annotations


class CoordinatorError(Exception):
    status = "INTERNAL"


class BadRequest(CoordinatorError):
    """Malformed input: wrong tensors, shapes, dtypes, non-finite values, bad header."""
    status = "INVALID_ARGUMENT"


class VersionMismatch(CoordinatorError):
    status = "FAILED_PRECONDITION"


class UnknownClient(CoordinatorError):
    status = "NOT_FOUND"


class NotAccepting(CoordinatorError):
    """Wrong round, round closed, client not sampled: the request came at the wrong time."""
    status = "FAILED_PRECONDITION"


class DuplicateUpdate(CoordinatorError):
    status = "ALREADY_EXISTS"


class PayloadTooLarge(CoordinatorError):
    status = "RESOURCE_EXHAUSTED"


class UploadInProgress(CoordinatorError):
    """A second upload stream from a client whose first one is still open; the client may retry."""
    status = "ABORTED"


class CorruptPayload(CoordinatorError):
    """Digest mismatch, truncated or out-of-order stream."""
    status = "DATA_LOSS"


class RegistryFull(CoordinatorError):
    status = "RESOURCE_EXHAUSTED"
