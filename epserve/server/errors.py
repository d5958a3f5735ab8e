"""Errors the server answers with, in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status that fits."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error that becomes one HTTP response. ``param`` names the request field at fault (or None)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, served: tuple[str, ...]) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves {', '.join(served)}",
                    param="model", code="model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Missing or invalid API key (send 'Authorization: Bearer <key>')",
                    type="authentication_error", code="invalid_api_key")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the limit of {limit} bytes", code="request_too_large")


def queue_full(message: str, retry_after_s: int) -> APIError:
    return APIError(503, f"The server is busy: {message}", type="server_error", code="queue_full",
                    headers={"Retry-After": str(max(1, int(retry_after_s)))})


def engine_unavailable(message: str, retry_after_s: int = 1) -> APIError:
    """503 with ``Retry-After``: a load balancer sends the request to another replica (draining, or down)."""
    return APIError(503, f"The engine is unavailable: {message}", type="server_error", code="engine_unavailable",
                    headers={"Retry-After": str(max(1, int(retry_after_s)))})


def engine_failed(message: str) -> APIError:
    return APIError(500, f"The engine failed: {message}", type="server_error", code="engine_error")


def client_closed() -> APIError:
    return APIError(499, "The client closed the request", code="client_closed_request")
