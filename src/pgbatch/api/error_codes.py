"""Every `error.code` the API answers with: an enum in the OpenAPI document.

A generated client turns the enum into a type it can match on, and refuses a value it does
not list: a route that answers a new code must add it here (tests/api/test_openapi.py reads
the sources for codes that are missing).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorCode"]


class ErrorCode(StrEnum):
    """The `code` of an API error: what went wrong, for a program to branch on."""

    # The request itself
    INVALID_REQUEST = "invalid_request"
    INVALID_BATCH = "invalid_batch"
    INVALID_DOCUMENT = "invalid_document"
    INTERNAL_TASK = "internal_task"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PRECONDITION_REQUIRED = "precondition_required"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"
    # Sizes and rates
    BODY_TOO_LARGE = "body_too_large"
    BODY_TIMEOUT = "body_timeout"
    ITEM_TOO_LARGE = "item_too_large"
    TOO_MANY_ITEMS = "too_many_items"
    SHARD_TOO_LARGE = "shard_too_large"
    TOO_MANY_UPLOADS = "too_many_uploads"
    TOO_MANY_SEARCHES = "too_many_searches"
    # Who may ask
    UNAUTHENTICATED = "unauthenticated"
    INVALID_TOKEN = "invalid_token"
    FORBIDDEN = "forbidden"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    MISDIRECTED_REQUEST = "misdirected_request"
    # The state of what the request names
    BATCH_NOT_FOUND = "batch_not_found"
    BATCH_PRUNED = "batch_pruned"
    COLLECTION_NOT_FOUND = "collection_not_found"
    DOCUMENT_NOT_FOUND = "document_not_found"
    LIBRARY_NOT_FOUND = "library_not_found"
    LIBRARY_EXISTS = "library_exists"
    PGVECTOR_MISSING = "pgvector_missing"
    MISSING_REFERENCES = "missing_references"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    INVALID_STATE = "invalid_state"
    STALE_VERSION = "stale_version"
    CONFLICT = "conflict"
    # The server and its database
    WRITE_FAILED = "write_failed"
    DATABASE_BUSY = "database_busy"
    SEARCH_TIMEOUT = "search_timeout"
    EMBEDDER_UNAVAILABLE = "embedder_unavailable"
    DATABASE_UNAVAILABLE = "database_unavailable"
    CLIENT_CLOSED = "client_closed"
    INTERNAL_ERROR = "internal_error"
