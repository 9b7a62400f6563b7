"""Every error leaves the coordinator as JSON ``{"error": {"code", "message", "details"}}``; never a stack trace."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from pydantic import ValidationError

from api.store.base import Conflict, NotFound, Unavailable

logger = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, details=None) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return web.json_response(body, status=status)


def validation_details(err: ValidationError) -> list[dict]:
    return [
        {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in err.errors(include_url=False, include_input=False)
    ]


class InvalidParameter(Exception):
    """A query or path parameter is malformed (422)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ValidationError as err:
        return error_response(422, "invalid_body", "the request body does not match the schema", validation_details(err))
    except json.JSONDecodeError as err:
        return error_response(422, "invalid_json", f"the request body is not valid JSON: {err.msg}")
    except InvalidParameter as err:
        return error_response(422, "invalid_parameter", str(err), {"parameter": err.name})
    except NotFound as err:
        return error_response(404, "not_found", str(err))
    except Conflict as err:
        return error_response(409, "conflict", str(err))
    except Unavailable as err:
        return error_response(503, "store_unavailable", f"the database is unavailable: {err}; retry shortly")
    except web.HTTPRequestEntityTooLarge:
        limit = request.app._client_max_size
        return error_response(413, "body_too_large", f"the request body exceeds {limit} bytes", {"max_bytes": limit})
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(err.status, "http_error")
        response = error_response(err.status, code, err.text or err.reason)
        for header in ("WWW-Authenticate", "Allow"):
            if header in err.headers:
                response.headers[header] = err.headers[header]
        return response
    except Exception:
        logger.exception("unhandled error method=%s path=%s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; the coordinator logged the details")
