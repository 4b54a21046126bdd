"""The dashboard's guards: pure ASGI middleware that answers a request before any page code sees it.

From the outside in (see `Dashboard.__init__`):

    security headers   every response: no framing, a strict Content-Security-Policy, no MIME sniffing
    host allow-list    a Host the dashboard was not started for: 400 (a DNS-rebinding page sends its own name)
    body limit         a body over `max_body` bytes: 413, reading no more of it than that
    token              with a token: `Authorization: Bearer`, or the login cookie; else 401
    origin             a POST whose Origin (or Referer) is not the dashboard itself: 403
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
COOKIE = "sonamu_token"

# 'self' only: the pages load their stylesheet and script from the dashboard, never inline, so an injected
# <script> or style attribute does nothing even if escaping were ever missed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # Not no-referrer: with it a browser sends `Origin: null` on a same-origin POST, which the origin guard
    # would refuse.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1), parsed, never prefix-matched:
    `127.0.0.1.nip.io` is a DNS name that can point anywhere."""
    name = host.strip().lower().removesuffix(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """`0.0.0.0` or `::`: listening on every interface, a bind address no browser ever names."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True)
class HostRule:
    """An allowed Host: a name, and the port it must carry (None: any port, for a name behind a proxy)."""

    name: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> HostRule:
        """`name`, `name:port`, `[v6]` or `[v6]:port`; a bare IPv6 address gets its brackets."""
        text = text.strip().lower()
        if text.count(":") > 1 and not text.startswith("["):
            return cls(f"[{text}]", None)
        name, _, port = text.rpartition(":") if text.rfind(":") > text.rfind("]") else (text, "", "")
        if not name or (port and not port.isdigit()):
            raise ValueError(f"not a host name or host:port: {text!r}")
        return cls(name, int(port) if port else None)


def allowed_hosts(bind_host: str, port: int | None, extra: Iterable[str] = ()) -> tuple[HostRule, ...]:
    """Loopback names at the dashboard's port, the name it was started on (unless a wildcard), and `extra`."""
    rules = [HostRule(name, port) for name in LOOPBACK_NAMES]
    bind = HostRule.parse(bind_host)
    if not is_wildcard(bind_host) and bind.name not in LOOPBACK_NAMES:
        rules.append(HostRule(bind.name, port))
    rules.extend(HostRule.parse(text) for text in extra)
    return tuple(rules)


def host_allowed(host_header: str, rules: Iterable[HostRule]) -> bool:
    try:
        offered = HostRule.parse(host_header)
    except ValueError:
        return False
    port = 80 if offered.port is None else offered.port  # a browser leaves out the default port
    return any(rule.name == offered.name and rule.port in (None, port) for rule in rules)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                kept = [(n, v) for n, v in message.get("headers", []) if n.lower() not in names]
                message["headers"] = [*kept, *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HostAllowList:
    """400 unless the Host header names this dashboard: a page on attacker.example whose name was rebound to
    127.0.0.1 still sends `Host: attacker.example`."""

    def __init__(self, app: ASGIApp, rules: tuple[HostRule, ...]) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not host_allowed(Headers(scope=scope).get("host", ""), self.rules):
            names = ", ".join(rule.name + (f":{rule.port}" if rule.port else "") for rule in self.rules)
            message = f"unknown Host; this dashboard answers to {names} (start it with --allowed-host NAME to add one)"
            await PlainTextResponse(message, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `max_body` bytes: refused on its Content-Length at once, or, sent in chunks, as soon
    as the chunks read pass the limit.

    The body is read here, whole, before the app sees it, then handed on as one message. Refused from inside
    the app's `receive`, a body over the limit became a 500: Starlette's error middleware had started its
    answer before the refusal reached this guard."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_body:
            await self._refuse(scope, receive, send, 413 if declared.isdigit() else 400)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees it as it would have
                break
            body += message.get("body", b"")
            if len(body) > self.max_body:  # read no further: at most one chunk past the limit is held
                await self._refuse(scope, receive, send, 413)
                return
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": bytes(body), "more_body": False}
                break
        handed_on = False

        async def replay() -> Message:
            nonlocal handed_on
            if handed_on:
                return await receive()
            handed_on = True
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        response = PlainTextResponse(f"request body over {self.max_body} bytes", status_code=status)
        await response(scope, receive, send)


class TokenGate:
    """With a token, a request needs `Authorization: Bearer <token>` or the login cookie.

    A browser cannot set a header on a link, so `?token=` logs in once: the answer sets an HttpOnly cookie
    (a digest of the token, not the token) and redirects to the same address without it, so the token does
    not stay in the address bar, the history or a Referer.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()
        self.cookie = hashlib.sha256(b"sonamu-tasks dashboard cookie\0" + self.token).hexdigest().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        query = QueryParams(scope["query_string"])
        if "token" in query:
            if not same_secret(query["token"], self.token):
                await _unauthorized(scope, receive, send)
                return
            rest = urlencode([(key, value) for key, value in query.multi_items() if key != "token"])
            path = "/" + scope["path"].lstrip("/")  # never `//host`: a redirect to another site
            response: Response = RedirectResponse(path + (f"?{rest}" if rest else ""), 303)
            response.set_cookie(COOKIE, self.cookie.decode(), httponly=True, samesite="strict", path="/")
            await response(scope, receive, send)
            return
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        bearer = scheme.lower() == "bearer" and same_secret(credentials.strip(), self.token)
        cookie = cookie_parser(headers.get("cookie", "")).get(COOKIE, "")
        if bearer or same_secret(cookie, self.cookie):
            await self.app(scope, receive, send)
            return
        await _unauthorized(scope, receive, send)


class OriginCheck:
    """403 for a POST from another site: its Origin (or, without one, its Referer) must be this dashboard.

    The Host was checked already, so "this dashboard" is the Host the request was sent to. With the per-page
    CSRF value in every form, a cross-site form post fails twice.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = Headers(scope=scope)
            source = headers.get("origin") or headers.get("referer") or ""
            parts = urlsplit(source) if source.isascii() else None
            own = headers.get("host", "").lower()
            if parts is None or parts.scheme not in ("http", "https") or parts.netloc.lower() != own:
                await PlainTextResponse("cross-origin request refused", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def same_secret(offered: str | bytes, expected: bytes) -> bool:
    """Constant-time comparison that also takes non-ASCII input (hmac refuses non-ASCII str)."""
    data = offered.encode("utf-8", "surrogateescape") if isinstance(offered, str) else offered
    return hmac.compare_digest(data, expected)


async def _unauthorized(scope: Scope, receive: Receive, send: Send) -> None:
    response = PlainTextResponse(
        "a token is required: send Authorization: Bearer <token>, or open the dashboard once with ?token=<token>",
        status_code=401,
        headers={"www-authenticate": "Bearer"},
    )
    await response(scope, receive, send)
