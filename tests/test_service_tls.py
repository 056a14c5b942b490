"""mTLS over real localhost gRPC: `crosslm certs`, who gets in, and whose submissions they see."""
import stat
import time

import grpc
import pytest
from cryptography import x509

from crosslm_client.transport import CrossLMClient, RetryPolicy, TlsFiles, TransportError
from crosslm_server.experiments.cli import main as crosslm_main
from crosslm_shared.bundle import sha256_file
from crosslm_shared.certs import common_name, make_certs
from crosslm_shared.errors import ConfigError
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
from service_helpers import start_server, tiny_bundle, tls_server_config

ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    return make_certs(root / "ours", server_hosts=[], silos=["a", "b"]), make_certs(root / "theirs", server_hosts=[],
                                                                                   silos=["a"])


@pytest.fixture(scope="module")
def server(tmp_path_factory, certs):
    ours, _ = certs
    s = start_server(tls_server_config(tmp_path_factory.mktemp("server"), ours.ca.parent))
    yield s
    s.stop(grace=1)


def tls(paths, silo) -> TlsFiles:
    cert, key = paths.silos[silo]
    return TlsFiles(ca=paths.ca, cert=cert, key=key)


def target(server) -> str:
    return f"localhost:{server.grpc_port}"  # a name in the server certificate's SANs


def list_with(channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.CrossLMStub(channel).ListSubmissions(pb.ListSubmissionsRequest(), timeout=10)
    return e.value


def test_certs_command_writes_a_ca_a_server_and_one_certificate_per_silo(tmp_path, capsys):
    out = tmp_path / "certs"
    assert crosslm_main(["certs", "--out", str(out), "--server-host", "crosslm.example.org",
                         "--server-host", "10.1.2.3", "--silos", "a,b,c,d"]) == 0
    assert "silo d" in capsys.readouterr().out
    for name in ("ca", "server", "a", "b", "c", "d"):
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600, name
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "crosslm.example.org"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    for silo in "abcd":
        assert common_name(x509.load_pem_x509_certificate((out / f"{silo}.pem").read_bytes())) == silo
    before = (out / "ca.pem").read_bytes()
    assert crosslm_main(["certs", "--out", str(out), "--silos", "a"]) == 2  # refuses to replace the CA
    assert (out / "ca.pem").read_bytes() == before
    assert crosslm_main(["certs", "--out", str(out), "--silos", "a", "--force"]) == 0
    assert (out / "ca.pem").read_bytes() != before


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_certs_for_localhost_or_an_ip_as_the_docs_give_it(tmp_path, host):
    out = tmp_path / "certs"
    assert crosslm_main(["certs", "--out", str(out), "--server-host", host, "--silos", "a"]) == 0
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    assert common_name(server) == host
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName)) | {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "127.0.0.1", host} <= names


def test_a_failed_certs_run_leaves_nothing_half_made(tmp_path, monkeypatch):
    import crosslm_shared.certs as certs_module

    real, calls = certs_module._write_cert, []

    def fail_on_the_third(path, cert):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, cert)

    monkeypatch.setattr(certs_module, "_write_cert", fail_on_the_third)
    out = tmp_path / "certs"
    with pytest.raises(OSError):
        make_certs(out, server_hosts=["localhost"], silos=["a", "b"])
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir()] in ([], ["certs"])  # no temporary folder either
    monkeypatch.setattr(certs_module, "_write_cert", real)
    make_certs(out, server_hosts=["localhost"], silos=["a", "b"])  # a rerun is not refused
    assert (out / "ca.pem").exists() and (out / "b.key").exists()


@pytest.mark.parametrize("bad", ["a,a", "../x", "ca", ""])
def test_certs_refuses_bad_silo_names(tmp_path, bad):
    with pytest.raises(ConfigError, match="silo"):
        make_certs(tmp_path, server_hosts=[], silos=[s for s in bad.split(",") if s] if bad else [])
    assert not (tmp_path / "ca.pem").exists()


def test_a_connection_without_a_client_certificate_is_refused(server, certs):
    ours, _ = certs
    creds = grpc.ssl_channel_credentials(root_certificates=ours.ca.read_bytes())
    assert list_with(grpc.secure_channel(target(server), creds)).code() == grpc.StatusCode.UNAVAILABLE
    plain = grpc.insecure_channel(target(server))
    assert list_with(plain).code() == grpc.StatusCode.UNAVAILABLE  # and no plaintext at all
    deadline = time.monotonic() + 30  # the refusals left it serving (its engine may still be loading)
    while not server.readiness()[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.readiness() == (True, "ready")


def test_a_certificate_from_another_ca_is_refused(server, certs):
    ours, theirs = certs
    cert, key = theirs.silos["a"]
    creds = grpc.ssl_channel_credentials(ours.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    assert list_with(grpc.secure_channel(target(server), creds)).code() == grpc.StatusCode.UNAVAILABLE
    with CrossLMClient(target(server), "a", tls=tls(theirs, "a"), retry=ONCE) as client:
        with pytest.raises(TransportError, match="certificate is not trusted"):  # nor does the client trust their CA
            client.list_submissions()


def test_round_trip_over_mtls_and_silo_b_cannot_touch_silo_a(server, certs, tmp_path):
    ours, _ = certs
    folder, manifest = tiny_bundle(tmp_path / "silo", silo="a")
    with CrossLMClient(target(server), "a", tls=tls(ours, "a")) as a, \
            CrossLMClient(target(server), "b", tls=tls(ours, "b"), retry=ONCE) as b:
        a.upload(folder, manifest, "a-tls-0001")
        sub = a.submit("a-tls-0001")
        assert [e.kind for e in a.watch(sub.submission_id)][-1] == "ready"
        done = a.get_submission(sub.submission_id)
        out = a.download(sub.submission_id, done.result, tmp_path / "back")
        assert all(sha256_file(out / f.name) == f.sha256 for f in done.result.files)
        for call in (lambda: b.get_submission(sub.submission_id), lambda: list(b.watch(sub.submission_id)),
                     lambda: b.download(sub.submission_id, done.result, tmp_path / "stolen"),
                     lambda: b.upload(folder, manifest, "b-tls-0001")):  # the manifest names silo a
            with pytest.raises(TransportError, match="PERMISSION_DENIED"):
                call()
        with pytest.raises(grpc.RpcError) as e:
            b.query_upload("a-tls-0001")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert b.list_submissions() == []
        assert not (tmp_path / "stolen").exists() or not any((tmp_path / "stolen").iterdir())


def test_the_silo_header_is_ignored_under_mtls(server, certs, tmp_path):
    """Identity is the certificate's CN: a silo-b certificate that claims to be "a" in the header is b."""
    ours, _ = certs
    cert, key = ours.silos["b"]
    creds = grpc.ssl_channel_credentials(ours.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    stub = pb_grpc.CrossLMStub(grpc.secure_channel(target(server), creds))
    folder, manifest = tiny_bundle(tmp_path / "silo", silo="a")
    with CrossLMClient(target(server), "a", tls=tls(ours, "a")) as a:
        a.upload(folder, manifest, "a-tls-0002")
        sub = a.submit("a-tls-0002")
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSubmission(pb.GetSubmissionRequest(submission_id=sub.submission_id),
                           metadata=(("x-crosslm-silo", "a"),), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = stub.ListSubmissions(pb.ListSubmissionsRequest(), metadata=(("x-crosslm-silo", "a"),), timeout=10)
    assert sub.submission_id not in [s.submission_id for s in listed.submissions]


def test_the_daemon_runs_a_round_over_mtls(server, certs, tmp_path):
    from test_client_daemon import write_silo

    from crosslm_client.cli import main

    ours, _ = certs
    cfg = write_silo(tmp_path, server, "a")
    cert, key = ours.silos["a"]
    text = cfg.read_text().replace("plaintext_dev_mode = true\n", f'ca = "{ours.ca}"\ncert = "{cert}"\nkey = "{key}"\n'
                                   f'server_name = "localhost"\n')
    cfg.write_text(text)
    assert main(["run", "--config", str(cfg)]) == 0
    cfg.write_text(text.replace(f'cert = "{cert}"', f'cert = "{ours.silos["b"][0]}"')
                   .replace(f'key = "{key}"', f'key = "{ours.silos["b"][1]}"'))
    assert main(["run", "--config", str(cfg)]) == 3  # a silo-b certificate may not upload silo a's model


def _daemon_exit(tmp_path, server, *, ca, cert, key) -> int:
    """The exit code of the silo-a daemon run over mTLS with these files."""
    from test_client_daemon import write_silo

    from crosslm_client.cli import main

    cfg = write_silo(tmp_path, server, "a")
    cfg.write_text(cfg.read_text().replace("plaintext_dev_mode = true\n", f'ca = "{ca}"\ncert = "{cert}"\n'
                                           f'key = "{key}"\nserver_name = "localhost"\n'))
    return main(["run", "--config", str(cfg)])


def test_the_daemon_without_its_key_file_exits_2_naming_it(server, certs, tmp_path, caplog):
    ours, _ = certs
    assert _daemon_exit(tmp_path, server, ca=ours.ca, cert=ours.silos["a"][0], key=tmp_path / "gone.key") == 2
    assert "[server] key file" in caplog.text and "gone.key" in caplog.text


def test_a_certificate_from_another_ca_gives_up_at_once_as_identity_refused_with_the_default_retry(server, certs):
    ours, theirs = certs
    cert, key = theirs.silos["a"]
    started = time.monotonic()
    # the server refuses the silo's certificate (the silo trusts the server: ours.ca)
    with CrossLMClient(target(server), "a", tls=TlsFiles(ca=ours.ca, cert=cert, key=key)) as client:
        with pytest.raises(TransportError, match="does not accept this silo's certificate") as e:
            client.list_submissions()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    # the silo does not trust the server (theirs.ca did not sign the server certificate)
    with CrossLMClient(target(server), "a", tls=tls(theirs, "a")) as client:
        with pytest.raises(TransportError, match="server's certificate is not trusted") as e:
            list(client.watch("sub-anything"))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - started < 20  # the default policy retries UNAVAILABLE for about a minute


def test_a_server_that_is_down_is_still_retried_as_unreachable(certs):
    import socket

    ours, _ = certs
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(initial_s=0.01, max_s=0.02, max_attempts=3)
    with CrossLMClient(f"localhost:{port}", "a", tls=tls(ours, "a"), retry=policy) as client:
        with pytest.raises(TransportError, match="after 3 attempts") as e:
            client.list_submissions()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_daemon_with_a_certificate_from_another_ca_exits_with_the_identity_code(server, certs, tmp_path):
    ours, theirs = certs
    cert, key = theirs.silos["a"]
    assert _daemon_exit(tmp_path, server, ca=ours.ca, cert=cert, key=key) == 3
