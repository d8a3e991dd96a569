"""A private CA and certificates for 127.0.0.1, made with `openssl` for a test run."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.prereqs import require


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run([require("openssl"), *map(str, args)], cwd=cwd, check=True, capture_output=True)


def issue(directory: Path, name: str, usage: str) -> tuple[Path, Path]:
    """A P-256 key and a certificate for 127.0.0.1 and localhost, signed by the test CA."""
    key, csr, cert, ext = (directory / f"{name}.{x}" for x in ("key", "csr", "crt", "ext"))
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        f"extendedKeyUsage={usage}\n"
        "keyUsage=critical,digitalSignature\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "subjectKeyIdentifier=hash\n"
    )
    openssl("req", *NEW_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=directory)
    openssl(
        *("x509", "-req", "-in", csr, "-days", "1", "-out", cert, "-extfile", ext),
        *("-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"),
        cwd=directory,
    )
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    """A private CA, a server certificate and a client certificate, in `directory`."""
    openssl(
        *("req", "-x509", *NEW_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1"),
        *("-subj", "/CN=sluice test CA", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=directory,
    )
    server_cert, server_key = issue(directory, "server", "serverAuth")
    client_cert, client_key = issue(directory, "client", "clientAuth")
    return Certificates(directory / "ca.crt", server_cert, server_key, client_cert, client_key)
