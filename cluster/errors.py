"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`.

Every refusal the gateway makes goes through `APIError`, so clients (the official
`openai` SDK included) get the status code and body shape they already handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.routing.pool_selector import ContextTooLong


class APIError(Exception):
    """An error answered to the client as-is (never a 500 with a stack trace).

    Raise it with a status and message, or subclass it and declare `status`, `type`,
    `code` and `param` on the class (the session and auth errors do)."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    param: str | None = None

    def __init__(
        self,
        status: int | None = None,
        message: str = "",
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
            self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        elif type is not None:
            self.type = type
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code
        self._headers = dict(headers or {})

    @property
    def headers(self) -> dict[str, str]:
        """Response headers (Retry-After, WWW-Authenticate); subclasses may compute them."""
        return self._headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def invalid_json(detail: str) -> APIError:
    return APIError(400, f"We could not parse the JSON body of your request: {detail}", code="invalid_json")


def model_not_found(requested: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model `{requested}` does not exist. This server serves `{served}`.",
        param="model",
        code="model_not_found",
    )


def context_length_exceeded(exc: ContextTooLong) -> APIError:
    """Prompt plus requested completion beyond the largest pool's context (the numbers are
    the pool selector's, so they are computed in one place)."""
    what = f"{exc.prompt_tokens} in the messages, {exc.completion_tokens} in the completion"
    return APIError(
        400,
        f"This model's maximum context length is {exc.limit} tokens. However, you requested "
        f"{exc.requested} tokens ({what}). Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )


def service_unavailable(message: str, retry_after_s: int = 5) -> APIError:
    return APIError(503, message, type="server_error", code="unavailable", headers={"Retry-After": str(retry_after_s)})
