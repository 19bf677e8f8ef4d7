"""Domain errors shared by the engine, the adapter loader and the API layer.

The API maps each class to one HTTP status and an OpenAI error `type`/`code`; model and
engine code raise them without knowing about HTTP.
"""

from __future__ import annotations


class AdapterHubError(Exception):
    """Base class. `code` is the machine-readable OpenAI error code."""

    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterNotFoundError(AdapterHubError):
    """The request named an adapter (or model id) that is not known."""

    code = "model_not_found"

    @classmethod
    def for_model(cls, ref: str, *, why: str = "") -> AdapterNotFoundError:
        """OpenAI's error for an unknown `model` (`why`, if given, is said in parentheses)."""
        reason = f" ({why})" if why else ""
        return cls(f"The model `{ref}` does not exist{reason}.", param="model")


class AdapterValidationError(AdapterHubError):
    """An adapter's files cannot be served with this base model (shapes, options, format)."""

    code = "invalid_adapter"


class ContextLengthError(AdapterHubError):
    """Prompt tokens plus max_tokens exceed the model's context window."""

    code = "context_length_exceeded"


class InvalidRequestError(AdapterHubError):
    """Any other client mistake in a request body."""

    code = "invalid_request"


class CapacityError(AdapterHubError):
    """The engine cannot take the request now (queue full, every adapter slot pinned)."""

    code = "server_busy"


class BaseModelError(AdapterHubError):
    """The base model cannot be resolved or loaded."""

    code = "base_model_unavailable"


class ConflictError(AdapterHubError):
    """The change contradicts current state (an adapter in use, an aliased version)."""

    code = "conflict"


class PayloadTooLargeError(AdapterHubError):
    """An upload or request body exceeds the configured size limit (413)."""

    code = "payload_too_large"

    @classmethod
    def over(cls, what: str, limit: int, *, flag: str, param: str | None) -> PayloadTooLargeError:
        """The one wording: what was too big, the limit, and the flag that sets it."""
        return cls(f"{what} exceeds the {limit}-byte limit ({flag})", param=param)


class UpstreamError(AdapterHubError):
    """A remote the server depends on (the Hugging Face Hub) cannot provide what was asked."""

    code = "upstream_error"


class NotFoundError(AdapterHubError):
    """An id in the request path names nothing (an unknown file or fine-tuning job)."""

    code = "not_found"


class QueueFullError(CapacityError):
    """The bounded request queue is full: retry after a moment (HTTP 429)."""

    code = "queue_full"


class ShuttingDownError(CapacityError):
    """The server is draining for shutdown and admits no new requests (HTTP 503)."""

    code = "shutting_down"


class ResourceExhaustedError(AdapterHubError):
    """The accelerator ran out of memory for this request; the server keeps serving (503)."""

    code = "out_of_memory"


class AuthenticationError(AdapterHubError):
    """No API key, or one the server does not know (HTTP 401)."""

    code = "invalid_api_key"


class PermissionDeniedError(AdapterHubError):
    """A valid key without the scope this route needs, e.g. an inference key on an admin
    route (HTTP 403)."""

    code = "insufficient_scope"
