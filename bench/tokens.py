"""A fresh RSA key and N distinct RS256 access tokens (one per line), minted in parallel.

python bench/tokens.py --count 1000 --out bench/out/tokens-1000.txt --key-dir bench/out
"""

from __future__ import annotations

import argparse
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://issuer.bench/"
AUDIENCE = "orders-api"
KID = "bench-1"
TTL = 900  # the default max_token_lifetime (15m): the longest a token may be issued for

_KEY: rsa.RSAPrivateKey | None = None


def provider(public_key: Path) -> dict[str, object]:
    """The bench issuer as one `providers` entry of a gateway config."""
    return {
        "name": "bench",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        "public_key_file": str(public_key),
    }


def write_key(key_dir: Path) -> tuple[Path, Path]:
    """(private PEM, public PEM), created once per directory."""
    private_path, public_path = key_dir / "bench-private.pem", key_dir / "bench-public.pem"
    if not private_path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_dir.mkdir(parents=True, exist_ok=True)
        private_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        public_path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return private_path, public_path


def _init(private_pem: bytes) -> None:
    global _KEY
    loaded = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    _KEY = loaded


def _mint(span: tuple[int, int, int]) -> list[str]:
    start, stop, issued = span
    assert _KEY is not None
    out = []
    for i in range(start, stop):
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": f"user-{i}",
            "scope": "orders:read",
            "iat": issued,
            "exp": issued + TTL,
            "jti": uuid.uuid4().hex,
        }
        out.append(jwt.encode(claims, _KEY, algorithm="RS256", headers={"kid": KID}))
    return out


def mint(count: int, private_path: Path, workers: int = 2) -> list[str]:
    """`count` distinct tokens issued now, valid for TTL seconds."""
    issued = int(time.time())
    step = max(1, min(5000, count // workers or 1))
    spans = [(i, min(i + step, count), issued) for i in range(0, count, step)]
    pem = private_path.read_bytes()
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(pem,)) as pool:
        return [token for chunk in pool.map(_mint, spans) for token in chunk]


def write_tokens(count: int, out: Path, key_dir: Path) -> Path:
    private_path, _ = write_key(key_dir)
    tokens = mint(count, private_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(tokens) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--key-dir", type=Path, required=True)
    args = parser.parse_args()
    write_tokens(args.count, args.out, args.key_dir)


if __name__ == "__main__":
    main()
