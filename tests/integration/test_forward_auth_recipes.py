"""The nginx and Caddy recipes of docs/forward-auth.md are the configs the edge tests run
(tests/edges.py): the same directives, line for line, once comments, addresses and the
test's own process settings are set aside. A recipe line changed in one place only would
leave the other untested or wrong."""

from __future__ import annotations

import re
from pathlib import Path

from edges import Caddy, Door, Nginx

DOCS = Path(__file__).resolve().parents[2] / "docs" / "forward-auth.md"
UPSTREAM, WS, DOOR, IDLEGATE = 1111, 2222, 3333, 4444


def directives(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", line.split("#")[0]).strip()
        if line:
            lines.append(line)
    return lines


def block(language: str, starting: str) -> str:
    found = re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), flags=re.S)
    return next(text for text in found if text.lstrip().startswith(starting))


def test_the_nginx_recipe_is_what_the_edge_tests_run(tmp_path: Path):
    recipe = directives(block("nginx", "map "))
    recipe = [
        line.replace("127.0.0.1:8080", f"127.0.0.1:{IDLEGATE}")
        .replace("http://orders:8000", f"http://127.0.0.1:{UPSTREAM}")
        .replace("http://chat:8000", f"http://127.0.0.1:{WS}")
        .replace("listen 80;", f"listen 127.0.0.1:{DOOR};")
        for line in recipe
        if not line.startswith("server_name ")
    ]
    tested = directives(Nginx(tmp_path, UPSTREAM, WS, [Door(DOOR, IDLEGATE)]).config())
    # The test's nginx.conf wraps the snippet in `http { }` with its own process settings.
    start = tested.index(recipe[0])
    assert tested[start:-1] == recipe


def test_the_caddy_recipe_is_what_the_edge_tests_run(tmp_path: Path):
    recipe = directives(block("caddyfile", "shop.example.com {"))
    recipe = [
        line.replace("127.0.0.1:8080", f"127.0.0.1:{IDLEGATE}")
        .replace("orders:8000", f"127.0.0.1:{UPSTREAM}")
        .replace("chat:8000", f"127.0.0.1:{WS}")
        .replace("shop.example.com {", f"http://:{DOOR} {{")
        for line in recipe
    ]
    tested = directives(Caddy(tmp_path, UPSTREAM, WS, [Door(DOOR, IDLEGATE)]).config())
    start = tested.index(recipe[0])
    site = tested[start:]
    assert site.pop(1) == "bind 127.0.0.1"  # the test's loopback-only site
    assert site == recipe
