"""Shared token, TLS and mutual TLS over real sockets on loopback."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.connection import ClientSecurity, CoordinatorConnection, NotAuthenticated
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from server.security import SecurityConfig
from tests.server.conftest import small_state, start_live_coordinator


@pytest.fixture
def token_coordinator(tmp_path):
    live = start_live_coordinator(tmp_path, small_state(), security=SecurityConfig(token="s3cret"))
    yield live
    live.stop()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_unauthenticated_and_never_joins(token_coordinator, token):
    connection = CoordinatorConnection(token_coordinator.address, patience_s=5, security=ClientSecurity(token=token))
    with pytest.raises(NotAuthenticated, match="missing or wrong token"):
        connection.join("intruder", 0)
    assert token_coordinator.coordinator.registry.num_joined() == 0
    # Streams are guarded too, not only unary calls.
    with pytest.raises(grpc.RpcError) as raised:
        list(connection.stub.GetTask(pb.TaskRequest(protocol_version=PROTOCOL_VERSION, client_id="x"),
                                     metadata=connection.metadata, timeout=5))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as raised:
        connection.stub.SubmitUpdate(iter([pb.UpdateMessage(header=pb.UpdateHeader())]), metadata=connection.metadata,
                                     timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    connection.close()


def test_right_token_joins_and_health_needs_no_token(token_coordinator):
    connection = CoordinatorConnection(token_coordinator.address, patience_s=5, security=ClientSecurity(token="s3cret"))
    assert connection.join("client-0", 0).partition_index == 0
    probe = health_pb2_grpc.HealthStub(grpc.insecure_channel(token_coordinator.address))
    status = probe.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    connection.close()


def _tls_coordinator(tmp_path, certificates, mutual: bool):
    ours = certificates / "ours"
    security = SecurityConfig(tls_cert=str(ours / "server.pem"), tls_key=str(ours / "server.key"),
                              tls_ca=str(ours / "ca.pem") if mutual else None)
    live = start_live_coordinator(tmp_path, small_state(), security=security)
    return live, live.address


def test_tls_client_verifies_the_server_and_joins(tmp_path, certificates):
    live, address = _tls_coordinator(tmp_path, certificates, mutual=False)
    try:
        good = CoordinatorConnection(address, patience_s=5, security=ClientSecurity(tls_ca=str(certificates / "ours" / "ca.pem")))
        assert good.join("client-0", 0).partition_index == 0
        good.close()
        # A client trusting another CA refuses the coordinator's certificate.
        wrong_ca = CoordinatorConnection(address, patience_s=5,
                                         security=ClientSecurity(tls_ca=str(certificates / "foreign" / "ca.pem")))
        with pytest.raises(NotAuthenticated, match="signed by a CA this client does not trust"):
            wrong_ca.join("client-1", -1)
        wrong_ca.close()
    finally:
        live.stop()


@pytest.mark.parametrize("client_cert", [None, "foreign"])
def test_mutual_tls_refuses_clients_without_the_right_certificate(tmp_path, certificates, client_cert):
    live, address = _tls_coordinator(tmp_path, certificates, mutual=True)
    ca = str(certificates / "ours" / "ca.pem")
    try:
        cert_dir = certificates / client_cert if client_cert else None
        security = ClientSecurity(tls_ca=ca, tls_cert=str(cert_dir / "client-0.pem") if cert_dir else None,
                                  tls_key=str(cert_dir / "client-0.key") if cert_dir else None)
        refused = CoordinatorConnection(address, patience_s=5, security=security)
        expected = "refused this client's certificate" if client_cert else "requires a client certificate"
        with pytest.raises(NotAuthenticated, match=expected):
            refused.join("intruder", -1)
        refused.close()
        assert live.coordinator.registry.num_joined() == 0
        ours = certificates / "ours"
        accepted = CoordinatorConnection(address, patience_s=5, security=ClientSecurity(
            tls_ca=ca, tls_cert=str(ours / "client-0.pem"), tls_key=str(ours / "client-0.key")))
        assert accepted.join("client-0", 0).partition_index == 0
        accepted.close()
    finally:
        live.stop()


def test_security_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        SecurityConfig(tls_cert="x.pem")
    with pytest.raises(ValueError, match="does not exist"):
        SecurityConfig(tls_cert=str(tmp_path / "a.pem"), tls_key=str(tmp_path / "a.key"))
