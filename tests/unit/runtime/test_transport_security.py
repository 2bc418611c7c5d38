"""Tokens never cross a network in clear: the URL check, the server's TLS options, the CLI refusals."""

from __future__ import annotations

import os

import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.runtime.transport_security import TlsOptions, check_server_url, server_tls_kwargs


@pytest.mark.parametrize("url", ["https://fleet.example", "https://10.0.0.2:8443/x", "http://127.0.0.1:8080",
                                 "http://127.8.9.1", "http://localhost:1", "http://[::1]:8080"])
def test_https_and_loopback_http_are_allowed(url):
    assert check_server_url(url, insecure_http=False) == url


@pytest.mark.parametrize("url", ["http://10.0.0.2:8080", "http://fleet.example", "http://[2001:db8::1]/"])
def test_plain_http_to_another_host_is_refused_unless_asked_for(url):
    with pytest.raises(EdgekilnError, match="refusing plain http:// to .*tokens would travel in clear") as exc:
        check_server_url(url, insecure_http=False)
    assert exc.value.exit_code == 2
    assert check_server_url(url, insecure_http=True) == url


@pytest.mark.parametrize("url", ["ftp://fleet.example", "fleet.example:8080", "https://"])
def test_not_a_server_url(url):
    with pytest.raises(EdgekilnError, match="is not http"):
        check_server_url(url, insecure_http=True)


def test_server_tls_needs_both_files_and_a_private_key(tmp_path):
    from edgekiln.fleet.tls_testing import make_test_ca

    ca, cert, key = make_test_ca(tmp_path)
    assert server_tls_kwargs(None, None) == {}
    assert server_tls_kwargs(cert, key) == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    with pytest.raises(EdgekilnError, match="both --tls-cert FILE and --tls-key FILE"):
        server_tls_kwargs(cert, None)
    with pytest.raises(EdgekilnError, match="not a matching PEM certificate and key"):
        server_tls_kwargs(ca, key)  # the CA's certificate with the server's key
    os.chmod(key, 0o644)
    with pytest.raises(EdgekilnError, match=r"readable by group/others \(mode 0644\): chmod 600"):
        server_tls_kwargs(cert, key)
    assert TlsOptions(ca=str(ca)).verify() is not True and TlsOptions().verify() is True


def test_cli_refuses_plain_http_off_this_machine(tmp_path, monkeypatch, capsys):
    from edgekiln.cli.app import main

    monkeypatch.setenv("EDGEKILN_ADMIN_TOKEN", "an-admin-token-0123456789")
    with pytest.raises(SystemExit) as exc:
        main(["devices", "list", "--server", "http://192.0.2.1:8080"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "refusing plain http:// to 192.0.2.1" in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path / 'f.db'}", "--keys", str(tmp_path / "k"),
              "--store", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "refusing to serve plain http on 0.0.0.0" in err, err
    assert not (tmp_path / "f.db").exists() and not (tmp_path / "k").exists()
