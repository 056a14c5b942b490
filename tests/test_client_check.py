"""`crosslm-client check` against a real mTLS server on port 0: one line per check, exit 0 only if all OK."""
import os

import pytest

from crosslm_client.cli import main
from crosslm_shared.certs import make_certs
from service_helpers import start_server, tls_server_config


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    return make_certs(root / "ours", server_hosts=[], silos=["silo-a", "silo-b"]), \
        make_certs(root / "theirs", server_hosts=[], silos=["silo-a"])


@pytest.fixture(scope="module")
def server(tmp_path_factory, certs):
    s = start_server(tls_server_config(tmp_path_factory.mktemp("server"), certs[0].ca.parent))
    yield s
    s.stop(grace=1)


def write(tmp_path, server, certs, **server_keys):
    ours, _ = certs
    cert, key = ours.silos["silo-a"]
    rows = "".join(f"review {i} text,{'pos' if i % 2 else 'neg'}\n" for i in range(12))
    (tmp_path / "data.csv").write_text("text,label\n" + rows)
    keys = {"address": f"localhost:{server.grpc_port}", "ca": str(ours.ca), "cert": str(cert), "key": str(key)}
    keys |= server_keys
    body = "".join(f'{k} = {v}\n' if isinstance(v, bool) else f'{k} = "{v}"\n' for k, v in keys.items() if v is not None)
    cfg = tmp_path / "silo.toml"
    cfg.write_text('[silo]\nname = "silo-a"\ntask = "rt"\nlabels = ["neg", "pos"]\ndata = "data.csv"\narch = "fakes.tiny_slm:TINY"\n'
                   f"[server]\n{body}")
    return cfg


def check(cfg, capsys) -> tuple[int, dict[str, str]]:
    code = main(["check", "--config", str(cfg)])
    lines = [l for l in capsys.readouterr().out.splitlines() if l[:4] in ("OK  ", "FAIL", "SKIP")]
    return code, {l.split()[1]: l for l in lines}


def test_a_good_config_passes_every_check(server, certs, tmp_path, capsys):
    code, lines = check(write(tmp_path, server, certs), capsys)
    assert code == 0, lines
    assert list(lines) == ["config", "data", "ca", "cert", "key", "address", "tls", "server"]
    assert all(l.startswith("OK") for l in lines.values())
    assert "12 examples (6 neg, 6 pos)" in lines["data"] and "'silo-a'" in lines["server"]


def test_a_missing_key_file_is_named(server, certs, tmp_path, capsys):
    code, lines = check(write(tmp_path, server, certs, key=tmp_path / "nope.key"), capsys)
    assert code == 1 and lines["key"].startswith("FAIL") and "nope.key" in lines["key"]
    assert "does not exist" in lines["key"] and "[server] key" in lines["key"]
    assert lines["tls"].startswith("SKIP") and lines["address"].startswith("OK")


def test_a_certificate_from_another_ca_is_caught(server, certs, tmp_path, capsys):
    cert, key = certs[1].silos["silo-a"]
    code, lines = check(write(tmp_path, server, certs, cert=cert, key=key), capsys)
    assert code == 1 and lines["cert"].startswith("FAIL") and "not signed by the CA" in lines["cert"]


def test_the_servers_view_of_a_foreign_certificate(server, certs, tmp_path, capsys):
    """With ca.pem from the other CA too, local checks pass but the handshake fails: said so."""
    theirs = certs[1]
    cert, key = theirs.silos["silo-a"]
    code, lines = check(write(tmp_path, server, certs, ca=theirs.ca, cert=cert, key=key), capsys)
    assert code == 1 and lines["cert"].startswith("OK") and lines["tls"].startswith("FAIL")
    assert "[server] ca is not the CA that signed the server" in lines["tls"]


def test_a_wrong_address_says_what_to_check(server, certs, tmp_path, capsys):
    code, lines = check(write(tmp_path, server, certs, address="127.0.0.1:1"), capsys)
    assert code == 1 and lines["address"].startswith("FAIL") and "is the server running" in lines["address"]
    assert lines["server"].startswith("SKIP") and lines["key"].startswith("OK")


def test_a_server_name_not_in_the_certificate(server, certs, tmp_path, capsys):
    code, lines = check(write(tmp_path, server, certs, server_name="elsewhere.example"), capsys)
    assert code == 1 and lines["tls"].startswith("FAIL") and "server_name" in lines["tls"]


def test_a_bad_csv_line_names_file_and_line(server, certs, tmp_path, capsys):
    cfg = write(tmp_path, server, certs)
    with (tmp_path / "data.csv").open("a") as f:
        f.write("a bad row,maybe\n")
    code, lines = check(cfg, capsys)
    assert code == 1 and lines["data"].startswith("FAIL")
    assert "data.csv:14" in lines["data"] and "'maybe'" in lines["data"]
    assert lines["server"].startswith("OK")  # the other checks still ran


def test_a_certificate_for_another_silo(server, certs, tmp_path, capsys):
    cert, key = certs[0].silos["silo-b"]
    code, lines = check(write(tmp_path, server, certs, cert=cert, key=key), capsys)
    assert code == 1 and "is for silo 'silo-b'" in lines["cert"]


def test_a_key_readable_by_others(server, certs, tmp_path, capsys):
    key = tmp_path / "loose.key"
    key.write_bytes(certs[0].silos["silo-a"][1].read_bytes())
    os.chmod(key, 0o644)
    code, lines = check(write(tmp_path, server, certs, key=key), capsys)
    assert code == 1 and "chmod 600" in lines["key"]


def test_a_config_error_is_one_failing_line(tmp_path, capsys):
    cfg = tmp_path / "silo.toml"
    cfg.write_text('[silo]\nname = "a"\nlabels = ["neg", "pos"]\n[server]\naddress = "localhost:1"\n')
    code, lines = check(cfg, capsys)
    assert code == 1 and list(lines) == ["config"] and "plaintext_dev_mode" in lines["config"]


def test_plaintext_dev_mode_skips_the_certificate_checks(tmp_path, capsys):
    from service_helpers import server_config

    plain = start_server(server_config(tmp_path / "server"))
    try:
        rows = "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(8))
        (tmp_path / "data.csv").write_text("text,label\n" + rows)
        cfg = tmp_path / "silo.toml"
        cfg.write_text('[silo]\nname = "silo-a"\nlabels = ["neg", "pos"]\ndata = "data.csv"\n'
                       f'[server]\naddress = "127.0.0.1:{plain.grpc_port}"\nplaintext_dev_mode = true\n')
        code, lines = check(cfg, capsys)
        assert code == 0, lines
        assert [n for n, l in lines.items() if l.startswith("SKIP")] == ["ca", "cert", "key", "tls"]
        assert lines["server"].startswith("OK")
    finally:
        plain.stop(grace=1)


def test_a_binary_data_file(server, certs, tmp_path, capsys):
    cfg = write(tmp_path, server, certs)
    (tmp_path / "data.csv").write_bytes(b"text,label\n\xff\xfe\x00bad,pos\n")
    code, lines = check(cfg, capsys)
    assert code == 1 and "UTF-8" in lines["data"]
