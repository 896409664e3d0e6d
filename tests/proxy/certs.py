"""Test certificates from the `openssl` CLI: one CA, leaf certificates for 127.0.0.1 with chosen
serial numbers, and a directory laid out like a mounted kubernetes.io/tls Secret volume
(tls.crt, tls.key -> ..data/ -> ..vN, swapped in one rename as the kubelet does)."""

from __future__ import annotations

import os
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    cert: bytes
    key: bytes


class TestCa:
    """A CA (P-256) that issues leaves for 127.0.0.1; clients trust it (`client_context`)."""

    __test__ = False  # not a pytest class

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=gpuproxy-test-ca",
                 "-days", "2", cwd=root)
        (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        self.ca_file = root / "ca.crt"

    def issue(self, serial: int, *, rsa: bool = False) -> Pair:
        """A leaf with `serial` (hex in getpeercert()['serialNumber']) and its key."""
        name = f"leaf{serial}"
        key_args = (["-newkey", "rsa:2048"] if rsa else
                    ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
        _openssl("req", *key_args, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", "/CN=localhost", cwd=self.root)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-set_serial", str(serial), "-days", "2", "-extfile", "san.ext",
                 "-out", f"{name}.crt", cwd=self.root)
        return Pair((self.root / f"{name}.crt").read_bytes(),
                    (self.root / f"{name}.key").read_bytes())

    def encrypted_key(self, pair: Pair) -> bytes:
        """`pair`'s key under a passphrase (the proxy must refuse it, never prompt)."""
        (self.root / "plain.key").write_bytes(pair.key)
        _openssl("pkey", "-in", "plain.key", "-aes256", "-passout", "pass:secret",
                 "-out", "encrypted.key", cwd=self.root)
        return (self.root / "encrypted.key").read_bytes()

    def client_context(self, **versions: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        for attr, version in versions.items():  # minimum_version=..., maximum_version=...
            setattr(ctx, attr, version)
        return ctx


def serial_of(peercert: object) -> int:
    assert isinstance(peercert, dict), peercert
    return int(peercert["serialNumber"], 16)


class TlsSecretVolume:
    """tls.crt / tls.key / ca.crt as the kubelet lays out a Secret volume."""

    def __init__(self, root: Path) -> None:
        self.root, self.version = root, 0
        root.mkdir(parents=True, exist_ok=True)

    @property
    def cert_file(self) -> str:
        return str(self.root / "tls.crt")

    @property
    def key_file(self) -> str:
        return str(self.root / "tls.key")

    def update(self, cert: bytes, key: bytes) -> None:
        self.version += 1
        data = self.root / f"..v{self.version}"
        data.mkdir()
        (data / "tls.crt").write_bytes(cert)
        (data / "tls.key").write_bytes(key)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(data.name)
        os.replace(tmp, self.root / "..data")
        for key_name in ("tls.crt", "tls.key"):
            if not (self.root / key_name).is_symlink():
                (self.root / key_name).symlink_to(f"..data/{key_name}")
