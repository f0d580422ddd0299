"""Forwarding to upstreams: header hygiene (`headers`), the transport interface and its error
family (`transport`), the lean HTTP/1.1 pool (`http1`), the aiohttp adapter
(`aiohttp_transport`) and the one relay (`proxy`); beyond one request and one response,
WebSockets (`websocket`) and the token deadlines that end long-lived exchanges (`deadlines`).
Nothing is imported here, so importing one module of the package loads no other."""
