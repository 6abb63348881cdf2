"""Dask's TLS settings of the dashboard apply to the fabric's routes: with
``distributed.scheduler.dashboard.tls.*`` set they are served over HTTPS only."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import ssl

import dask
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client

import datafabric
from tests.http_helpers import http_cluster


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return str(cert_file), str(key_file)


def test_the_routes_use_the_dashboards_tls(tmp_path):
    cert, key = self_signed(tmp_path)
    tls = {"distributed.scheduler.dashboard.tls.cert": cert, "distributed.scheduler.dashboard.tls.key": key}
    with dask.config.set(tls), http_cluster() as cluster, Client(cluster) as client:
        fabric = datafabric.start(client, mb=16)
        try:
            port = cluster.scheduler.http_server.port
            assert fabric.web_page() == f"https://127.0.0.1:{port}/fabric/"
            context = ssl.create_default_context(cafile=cert)
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
            conn.request("GET", "/fabric/api/v1/status")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["fabric_id"] == fabric.fabric_id
            conn.close()
            plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                plain.request("GET", "/fabric/api/v1/status")
                plain.getresponse()
            plain.close()
        finally:
            fabric.shutdown()
