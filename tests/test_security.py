"""TLS, mutual TLS and token scopes against a running server. The test makes its own CA and
certificates with the openssl command line at run time."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from policyloop.cli import main
from policyloop.contract.errors import InvalidArgument
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from serving.auth import load_tokens, required_scope
from tests.server_harness import health_status, make_registry, running_server, serve_config

APP_TOKEN = "app-token-0123456789abcdef"
OPS_TOKEN = "ops-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, server.pem/server.key (for 127.0.0.1 and localhost), client.pem/client.key
    signed by the CA, and other-client.pem/.key from an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN={ca}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("other-client", "other-ca")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
                 *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)
    return d


def _decide(channel: grpc.Channel, token: str | None = None) -> pb.DecideResponse:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    return pb_grpc.DecisionServiceStub(channel).Decide(
        pb.DecideRequest(policy="routing", context=pb.Features(dense=[0.1] * 5)),
        timeout=5, metadata=metadata)


def _tls_channel(target: str, pki: Path, client: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None)
    return grpc.secure_channel(target, credentials)


def test_tls_serves_encrypted_clients_and_refuses_plaintext(tmp_path: Path, pki: Path) -> None:
    make_registry(tmp_path / "registry")
    config = serve_config(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    with running_server(config) as server:
        with _tls_channel(server.target, pki) as channel:
            assert _decide(channel).event_id
        with grpc.insecure_channel(server.target) as channel, \
                pytest.raises(grpc.RpcError) as refused:
            _decide(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tmp_path: Path, pki: Path) -> None:
    make_registry(tmp_path / "registry")
    config = serve_config(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                          tls_client_ca=pki / "ca.pem")
    with running_server(config) as server:
        with _tls_channel(server.target, pki, client="client") as channel:
            assert _decide(channel).event_id
        for client in (None, "other-client"):
            with _tls_channel(server.target, pki, client=client) as channel, \
                    pytest.raises(grpc.RpcError) as refused:
                _decide(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, client


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(f"""
[tokens.app]
sha256 = "{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}"
scopes = ["decide", "reward"]

[tokens.ops]
token = "{OPS_TOKEN}"
scopes = ["admin"]

[tokens.reader]
token = "{READ_TOKEN}"
scopes = ["decide"]
""")
    return path


def test_two_authorization_headers_are_refused_and_the_scheme_ignores_case(
        tmp_path: Path, tokens_file: Path) -> None:
    make_registry(tmp_path / "registry")
    with running_server(serve_config(tmp_path, tokens_file=tokens_file)) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.DecisionServiceStub(channel)
        decide = pb.DecideRequest(policy="routing", context=pb.Features(dense=[0.1] * 5))
        stub.Decide(decide, timeout=5, metadata=[("authorization", f"bearer {APP_TOKEN}")])
        with pytest.raises(grpc.RpcError) as refused:
            stub.Decide(decide, timeout=5, metadata=[("authorization", f"Bearer {READ_TOKEN}"),
                                                     ("authorization", f"Bearer {APP_TOKEN}")])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "2 authorization headers" in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as wrong_case:
            stub.Decide(decide, timeout=5,
                        metadata=[("authorization", f"Bearer {APP_TOKEN.upper()}")])
        assert "unknown token" in (wrong_case.value.details() or "")


def test_the_traffic_generator_sends_its_token(tmp_path: Path, tokens_file: Path) -> None:
    import asyncio

    from policyloop.registry.local import LocalRegistry
    from policyloop.simulate import TrafficConfig, run_traffic
    from serving.config import PolicyConfig
    from tests.bandit_stream import register_untrained_routing

    register_untrained_routing(LocalRegistry(tmp_path / "registry"))
    config = serve_config(tmp_path, tokens_file=tokens_file,
                          policies={"routing": PolicyConfig(strategy="softmax:0.5")})
    with running_server(config) as server:
        traffic = TrafficConfig(target=server.target, scenario="routing", events=30,
                                reward_delay_ms=0, reward_loss=0, token=APP_TOKEN)
        sent = asyncio.run(run_traffic(traffic))
        assert sent.decisions == 30 and sent.rewards_sent == 30 and not sent.errors
        anonymous = asyncio.run(run_traffic(replace(traffic, token="")))
        assert anonymous.decisions == 0 and anonymous.errors == {"Decide:UNAUTHENTICATED": 30}


def test_tokens_and_scopes(tmp_path: Path, tokens_file: Path,
                           caplog: pytest.LogCaptureFixture) -> None:
    make_registry(tmp_path / "registry")
    caplog.set_level(logging.DEBUG)
    config = serve_config(tmp_path, tokens_file=tokens_file)
    with running_server(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.DecisionServiceStub(channel)
        admin = pb_grpc.AdminServiceStub(channel)

        def code(call: grpc.UnaryUnaryMultiCallable[Any, Any], request: Any,
                 token: str | None) -> grpc.StatusCode:
            metadata = (("authorization", f"Bearer {token}"),) if token else None
            try:
                call(request, timeout=5, metadata=metadata)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        decide = pb.DecideRequest(policy="routing", context=pb.Features(dense=[0.1] * 5))
        reward = pb.RewardRequest(event_id="e-1", value=1.0)
        unpin = pb.UnpinRequest(policy="routing")
        assert code(stub.Decide, decide, None) == grpc.StatusCode.UNAUTHENTICATED
        assert code(stub.Decide, decide, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED
        assert code(stub.Decide, decide, APP_TOKEN) == grpc.StatusCode.OK
        assert code(stub.Reward, reward, APP_TOKEN) == grpc.StatusCode.OK
        assert code(stub.Reward, reward, READ_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
        assert code(admin.Unpin, unpin, APP_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
        assert code(admin.Unpin, unpin, OPS_TOKEN) == grpc.StatusCode.OK
        assert code(stub.Decide, decide, OPS_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
        # probes need no token
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        try:
            stub.Decide(decide, timeout=5, metadata=[("authorization", "Bearer wrong")])
        except grpc.RpcError as exc:
            assert "unknown token" in (exc.details() or "")
        # the admin command carries its token
        assert main(["admin", "unpin", "--target", server.target, "--policy", "routing",
                     "--token", OPS_TOKEN]) == 0
    logged = caplog.text
    assert "refused" in logged
    for secret in (APP_TOKEN, OPS_TOKEN, READ_TOKEN, "not-a-token"):
        assert secret not in logged


@pytest.mark.parametrize("body,field", [
    ('[tokens.a]\nscopes = ["decide"]\n', "tokens.a needs sha256"),
    ('[tokens.a]\ntoken = "short"\nscopes = ["decide"]\n', "tokens.a needs sha256"),
    ('[tokens.a]\nsha256 = "abc"\nscopes = ["decide"]\n', "tokens.a.sha256"),
    (f'[tokens.a]\ntoken = "{APP_TOKEN}"\nscopes = ["root"]\n', "tokens.a.scopes"),
    ("", "no [tokens.NAME] entries"),
])
def test_a_bad_tokens_file_is_refused_with_the_entry_named(tmp_path: Path, body: str,
                                                           field: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(body)
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace(".", r"\.")):
        load_tokens(path)


def test_every_rpc_of_our_services_needs_a_scope_and_probes_do_not() -> None:
    for service in (pb.DESCRIPTOR.services_by_name["DecisionService"],
                    pb.DESCRIPTOR.services_by_name["AdminService"]):
        for method in service.methods:
            assert required_scope(f"/{service.full_name}/{method.name}") is not None
    assert required_scope("/inference.GRPCInferenceService/ModelInfer") == "decide"
    assert required_scope("/grpc.health.v1.Health/Check") is None
    assert required_scope(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_tls_settings_must_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="tls_cert and tls_key"):
        serve_config(tmp_path, tls_cert=tmp_path / "c.pem").validate()
    with pytest.raises(InvalidArgument, match="tls_client_ca"):
        serve_config(tmp_path, tls_client_ca=tmp_path / "ca.pem").validate()



@pytest.mark.parametrize("name", ["tls_cert", "tls_key", "tls_client_ca"])
def test_a_tls_file_that_is_missing_or_no_pem_is_named_at_start(tmp_path: Path, pki: Path,
                                                                 name: str) -> None:
    make_registry(tmp_path / "registry")
    files = {"tls_cert": pki / "server.pem", "tls_key": pki / "server.key"}
    (tmp_path / "notes.txt").write_text("not a certificate")
    for wrong, problem in ((tmp_path / "gone", "No such file"), (tmp_path, "directory"),
                           (tmp_path / "notes.txt", "not a PEM file")):
        with pytest.raises(InvalidArgument, match=f"{name} {wrong}: .*{problem}"), \
                running_server(serve_config(tmp_path, **{**files, name: wrong})):
            pass


def test_a_key_that_is_not_the_certificates_is_named_at_start(tmp_path: Path, pki: Path) -> None:
    """grpc itself would say only "Failed to bind to address" (issue 16, finding 9)."""
    make_registry(tmp_path / "registry")
    config = serve_config(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "client.key")
    with pytest.raises(InvalidArgument, match=f"tls_cert {pki}/server.pem and tls_key "
                                              f"{pki}/client.key are not a usable pair: "
                                              "KEY_VALUES_MISMATCH"), running_server(config):
        pass


def test_serve_says_in_one_line_when_its_bus_path_cannot_be_made(tmp_path: Path) -> None:
    import sys

    (tmp_path / "afile").write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "policyloop.cli", "serve", "--registry", str(tmp_path / "reg"),
         "--bus-path", str(tmp_path / "afile" / "bus"), "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"policyloop serve: Not a directory: {tmp_path}/afile/bus")


def test_evaluate_target_and_admin_speak_mutual_tls(tmp_path: Path, pki: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    make_registry(tmp_path / "registry")
    log = tmp_path / "log.csv"
    rows = ["action,reward,propensity,x0,x1,x2,x3,x4"] + [
        f"queue-{i % 3},{i % 2},0.5,{i / 40},0.1,0.2,0.3,0.4" for i in range(40)]
    log.write_text("\n".join(rows) + "\n")
    config = serve_config(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                          tls_client_ca=pki / "ca.pem")
    client = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
              "--tls-key", str(pki / "client.key")]
    with running_server(config) as server:
        evaluate = ["evaluate", str(log), "--registry", str(tmp_path / "registry"),
                    "--policy", "routing", "--target", server.target, "--json"]
        capsys.readouterr()
        assert main([*evaluate, *client]) == 0
        served = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["served"]
        assert served == {"target": server.target, "policy": "routing", "version": 1,
                          "strategy": "softmax:0.5"}
        assert main(["admin", "pin", "--target", server.target, "--policy", "routing",
                     "--version", "1", *client]) == 0
        assert main(evaluate) == 2  # plaintext to a TLS server
        assert "GetPolicyInfo('routing') failed: UNAVAILABLE" in capsys.readouterr().err
        assert main([*evaluate, "--tls-ca", str(pki / "ca.pem"),
                     "--tls-cert", str(pki / "client.pem")]) == 2
        assert "--tls-cert and --tls-key come together" in capsys.readouterr().err
        assert main([*evaluate, "--tls-ca", str(tmp_path / "missing.pem")]) == 2
        assert f"--tls-ca {tmp_path}/missing.pem: No such file" in capsys.readouterr().err
