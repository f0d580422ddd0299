"""Forwarding's size before and after issue 12's redesign, in code lines and raw lines.

python3 bench/code_size.py

Code lines are the lines that are not blank, not comment-only and not inside a docstring (the
count issue 12 item 1 is measured by). "Before" is the forwarding code as it stood before the
redesign (`gateway/upstream.py` and `gateway/proxy.py` at 5be3f9e^, read with `git show`),
"after" the working tree's gateway/forward/ without what is new behaviour (websocket.py,
deadlines.py).
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE_REV = "5be3f9e^"  # the parent of "One forwarding path: gateway/forward/ ..."
BEFORE = ("gateway/upstream.py", "gateway/proxy.py")
AFTER = tuple(
    f"gateway/forward/{name}.py"
    for name in ("__init__", "aiohttp_transport", "transport", "headers", "proxy", "http1")
)
_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def code_lines(source: str) -> int:
    """Lines holding a token that is not a comment, outside module, class and function
    docstrings."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return len(lines)


def _git_show(rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def _table(title: str, sources: dict[str, str]) -> tuple[int, int]:
    print(title)
    code_total = raw_total = 0
    for path, source in sources.items():
        code, raw = code_lines(source), len(source.splitlines())
        code_total += code
        raw_total += raw
        print(f"  {code:6d} {raw:6d}  {path}")
    print(f"  {code_total:6d} {raw_total:6d}  total")
    return code_total, raw_total


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print("    code    raw")
    before = _table(f"before ({BEFORE_REV}):", {p: _git_show(BEFORE_REV, p) for p in BEFORE})
    after = _table("after (working tree):", {path: (ROOT / path).read_text() for path in AFTER})
    print(f"change: {after[0] - before[0]:+d} code lines, {after[1] - before[1]:+d} raw lines")


if __name__ == "__main__":
    main()
