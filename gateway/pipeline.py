"""The request's way through the gateway, each step written once.

Rendering a refusal lives here, with the web stack; `reasons.py` stays free of aiohttp.
"""

from __future__ import annotations

from aiohttp import web

from gateway.reasons import Refusal, rfc6750_text


def render_refusal(refusal: Refusal, request_id: str) -> web.Response:
    """The contract's refusal: JSON body, `Cache-Control: no-store`, and for 401/403 a
    `WWW-Authenticate` challenge (no `error` attribute when the token is simply missing)."""
    reason = refusal.reason
    description = rfc6750_text(refusal.detail)
    headers = {"Cache-Control": "no-store", "X-Request-ID": request_id}
    if reason.status in (401, 403):
        challenge = 'Bearer realm="idlegate"'
        if reason.oauth_error is not None:
            challenge += f', error="{reason.oauth_error}", error_description="{description}"'
        if refusal.scope is not None:
            challenge += f', scope="{rfc6750_text(refusal.scope)}"'
        headers["WWW-Authenticate"] = challenge
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(refusal.retry_after)
    body = {
        "error": reason.oauth_error or reason.code,
        "reason": reason.code,
        "message": description,
        "request_id": request_id,
    }
    return web.json_response(body, status=reason.status, headers=headers)
