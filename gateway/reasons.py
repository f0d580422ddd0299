"""The one table of refusal reasons: stable code, HTTP status, OAuth error and message.

Handlers raise `Refusal(Reason.X)`; `pipeline.render_refusal` turns it into the one response
shape (JSON body, `WWW-Authenticate`), called once by the request pipeline. The code is also the
`reason` label of `idlegate_requests_total`. No aiohttp here: the pure decisions
(`tokens/policy.py`) raise refusals without loading the web stack.

A refusal's detail names the problem, never the token's own text (its alg, kid or claims):
what the attacker sent is not echoed, and `rfc6750_text` still restricts what reaches the
header to RFC 6750's charset, in case a detail ever does carry foreign text.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _ReasonSpec:
    code: str  # stable: the contract's reason code, spelled out (never derived from a name)
    status: int
    oauth_error: str | None
    message: str


class Reason(enum.Enum):
    MISSING_TOKEN = _ReasonSpec("missing_token", 401, None, "a bearer token is required")
    MALFORMED_REQUEST = _ReasonSpec(
        "malformed_request", 400, "invalid_request", "the request's credentials are malformed"
    )
    MALFORMED_TOKEN = _ReasonSpec(
        "malformed_token", 401, "invalid_token", "the token is not a well-formed JWT"
    )
    DISALLOWED_ALG = _ReasonSpec(
        "disallowed_alg", 401, "invalid_token", "the token's algorithm is not allowed"
    )
    UNKNOWN_KEY = _ReasonSpec(
        "unknown_key", 401, "invalid_token", "the token was signed by an unknown key"
    )
    BAD_SIGNATURE = _ReasonSpec(
        "bad_signature", 401, "invalid_token", "the token's signature is invalid"
    )
    WRONG_ISSUER = _ReasonSpec(
        "wrong_issuer", 401, "invalid_token", "the token's issuer is not trusted"
    )
    WRONG_AUDIENCE = _ReasonSpec(
        "wrong_audience", 401, "invalid_token", "the token is not meant for this API"
    )
    WRONG_TYPE = _ReasonSpec("wrong_type", 401, "invalid_token", "the token has the wrong type")
    MISSING_CLAIM = _ReasonSpec(
        "missing_claim", 401, "invalid_token", "the token lacks a required claim"
    )
    EXPIRED = _ReasonSpec("expired", 401, "invalid_token", "the token has expired")
    NOT_YET_VALID = _ReasonSpec("not_yet_valid", 401, "invalid_token", "the token is not valid yet")
    ISSUED_IN_FUTURE = _ReasonSpec(
        "issued_in_future", 401, "invalid_token", "the token was issued in the future"
    )
    LIFETIME_TOO_LONG = _ReasonSpec(
        "lifetime_too_long",
        401,
        "invalid_token",
        "the token was issued with a lifetime over the allowed maximum",
    )
    IDLE_TIMEOUT = _ReasonSpec(
        "idle_timeout", 401, "invalid_token", "the token was idle for too long"
    )
    REVOKED = _ReasonSpec("revoked", 401, "invalid_token", "the token has been revoked")
    SESSION_IDLE = _ReasonSpec(
        "session_idle", 401, "invalid_token", "the session was idle for too long"
    )
    SESSION_TOO_OLD = _ReasonSpec(
        "session_too_old", 401, "invalid_token", "the session is older than allowed"
    )
    INSUFFICIENT_SCOPE = _ReasonSpec(
        "insufficient_scope",
        403,
        "insufficient_scope",
        "the token lacks a scope this route requires",
    )
    INSUFFICIENT_ROLE = _ReasonSpec(
        "insufficient_role",
        403,
        "insufficient_scope",
        "the token lacks a role this route requires",
    )
    NO_ROUTE = _ReasonSpec("no_route", 404, None, "no route matches this path")
    # TRACE/TRACK (an upstream echoing them would send back the client's Authorization and the
    # gateway's identity headers) and CONNECT (a tunnel, not a request): never forwarded.
    METHOD_NOT_ALLOWED = _ReasonSpec(
        "method_not_allowed", 405, None, "the gateway does not forward this method"
    )
    BAD_PATH = _ReasonSpec("bad_path", 400, "invalid_request", "the request path is not acceptable")
    # Forward-auth (gateway/forward_auth.py): a peer not in forward_auth.trusted_proxies, and an
    # auth request that does not say, unambiguously, which request to decide.
    UNTRUSTED_PROXY = _ReasonSpec(
        "untrusted_proxy", 403, None, "only a trusted proxy may ask for forward-auth decisions"
    )
    NO_ORIGINAL_REQUEST = _ReasonSpec(
        "no_original_request",
        400,
        "invalid_request",
        "the forward-auth request does not say which request to decide",
    )
    WEBSOCKET_NOT_ENABLED = _ReasonSpec(
        "websocket_not_enabled",
        400,
        "invalid_request",
        "this route does not accept WebSocket upgrades",
    )
    UNSUPPORTED_TRANSFER_CODING = _ReasonSpec(
        "unsupported_transfer_coding",
        400,  # RFC 9112 §6.1 suggests 501; 400 keeps a client's junk `rejected`, not `error`
        "invalid_request",
        "the request body's transfer coding is not supported (only chunked)",
    )
    # Refused by the HTTP parser before any of the gateway's steps (smuggling attempts,
    # scanners, oversized or garbled heads): the connection is closed after the answer.
    MALFORMED_HTTP = _ReasonSpec("malformed_http", 400, None, "the HTTP request is malformed")
    # The client stopped sending a request body it announced (server.body_timeout).
    REQUEST_TIMEOUT = _ReasonSpec(
        "request_timeout", 408, None, "the request body did not arrive in time"
    )
    # The client closed its connection before its request body was complete (nginx logs
    # such a request as 499): nobody reads the answer, the count and the log say what happened.
    CLIENT_CLOSED = _ReasonSpec(
        "client_closed", 400, None, "the client closed the connection during its request body"
    )
    PAYLOAD_TOO_LARGE = _ReasonSpec("payload_too_large", 413, None, "the request body is too large")
    STORE_UNAVAILABLE = _ReasonSpec(
        "store_unavailable", 503, None, "the session store is unavailable, retry shortly"
    )
    UPSTREAM_UNAVAILABLE = _ReasonSpec(
        "upstream_unavailable", 502, None, "the upstream service is unavailable"
    )
    UPSTREAM_TIMEOUT = _ReasonSpec(
        "upstream_timeout", 504, None, "the upstream service did not answer in time"
    )
    INTERNAL_ERROR = _ReasonSpec(
        "internal_error", 500, None, "the gateway failed to handle the request"
    )
    # A request still in flight when shutdown_grace ran out: its connection is cut, no answer
    # goes out; the count and the access log say what became of it.
    SHUTDOWN = _ReasonSpec(
        "shutdown", 503, None, "the gateway shut down before the request was answered"
    )

    @property
    def code(self) -> str:
        return self.value.code

    @property
    def status(self) -> int:
        return self.value.status

    @property
    def oauth_error(self) -> str | None:
        return self.value.oauth_error

    @property
    def message(self) -> str:
        return self.value.message

    @property
    def decision(self) -> str:
        """`error` for failures of the gateway or upstream, `rejected` for refusals."""
        return "error" if self.status >= 500 else "rejected"


class Refusal(Exception):
    """Raised anywhere on the request path; rendered once by `pipeline.render_refusal`.

    `detail` is fixed text of ours (config names and numbers may appear), never token text."""

    def __init__(
        self,
        reason: Reason,
        detail: str | None = None,
        *,
        scope: str | None = None,
        retry_after: int | None = None,
        close_connection: bool = False,
        allow: str | None = None,
    ) -> None:
        super().__init__(detail or reason.message)
        self.reason = reason
        self.detail = detail or reason.message
        self.scope = scope
        self.retry_after = retry_after
        # The request's framing was in doubt: whatever follows it on the connection is too.
        self.close_connection = close_connection
        self.allow = allow  # a 405's Allow header: the methods the target answers


# RFC 6750 §3: error_description and scope use %x20-21 / %x23-5B / %x5D-7E: printable ASCII
# without the double quote and the backslash.
_NOT_RFC6750 = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def rfc6750_text(text: str) -> str:
    """`text` with every character outside RFC 6750's attribute charset replaced by `?`: a
    header value built from it can hold no quote, backslash, CR/LF or non-ASCII byte."""
    return _NOT_RFC6750.sub("?", text.replace('"', "'"))
