"""Why a TLS connection to the coordinator failed, in one sentence.

gRPC reports a failed handshake as "Tls handshake failed", "Socket closed" or a failed verification check,
without saying which certificate was wrong or why. When the client sees such a refusal it calls
:func:`diagnose_tls`, which repeats the handshake with Python's ``ssl`` module on a connection of its own,
trusting the same CA, presenting the same client certificate and checking the same host name, and names the
problem: an untrusted CA, a certificate for another host name, an expired certificate, a coordinator that
requires (or refused) a client certificate, or client certificate files that cannot be used.

Also here: the host and port of a gRPC target, and whether that host is loopback (for the token guard in
client/connection.py). Neither resolves names: only literal loopback addresses and ``localhost`` count.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.connection import ClientSecurity

DEFAULT_TLS_PORT = 443   # gRPC's default for a target without a port

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) that mean "not signed by a CA we trust".
_UNTRUSTED_ISSUER = {
    2,    # unable to get issuer certificate
    7,    # certificate signature failure: a CA with the same name but another key
    18,   # self-signed certificate
    19,   # self-signed certificate in certificate chain
    20,   # unable to get local issuer certificate
    21,   # unable to verify the first certificate
}
_NOT_YET_VALID = 9
_EXPIRED = 10
_INVALID_PURPOSE = 26
_NAME_MISMATCH = {62, 63, 64}   # host name, email, IP address mismatch

# Alerts a server sends when it requires a client certificate and got none.
_CERTIFICATE_REQUIRED = {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE",
                         "PEER_DID_NOT_RETURN_A_CERTIFICATE"}
# Alerts a server sends when it refuses the client certificate it got.
_CERTIFICATE_REFUSED = {
    "TLSV1_ALERT_UNKNOWN_CA": "signed by a CA it does not trust",
    "SSLV3_ALERT_BAD_CERTIFICATE": "a bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "a certificate it cannot verify",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "an expired certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "a certificate not meant for a TLS client (extendedKeyUsage clientAuth)",
    "TLSV1_ALERT_DECRYPT_ERROR": "a certificate whose signature does not verify",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "a certificate it does not accept",
}
# What an OpenSSL client reports when the peer does not speak TLS at all (a plaintext gRPC server).
_NOT_TLS = {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL",
            "HTTP_REQUEST", "UNEXPECTED_EOF_WHILE_READING", "UNEXPECTED_RECORD", "BAD_PACKET_LENGTH"}


def split_target(address: str) -> tuple[str, int | None]:
    """Host and port of a gRPC target: ``host:port``, ``[v6]:port``, ``dns:///host:port``, a bare host.

    Other schemes (``ipv4:a:p,b:p``, ``unix:path``) come back whole as the host, with no port.
    """
    target = address
    if target.startswith("dns:"):
        target = target[len("dns:"):]
        if target.startswith("//"):                         # dns://authority/host:port
            target = target[2:].split("/", 1)[-1]
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif target.count(":") == 1:
        host, port = target.split(":")
    else:
        host, port = target, ""
    return host, int(port) if port.isdigit() else None


def is_loopback(address: str) -> bool:
    """Whether a gRPC target stays on this machine: a literal loopback IP, ``localhost`` or a Unix socket."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host, _port = split_target(address)
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False                                        # a name: not resolved here, so not trusted
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def diagnose_tls(address: str, security: ClientSecurity, timeout_s: float = 5.0) -> str | None:
    """Handshake with the coordinator as the gRPC client would and name what fails, or None if nothing does.

    None also when the probe cannot reach the coordinator at all: then there is nothing to diagnose.
    """
    host, port = split_target(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)       # verifies the chain and the host name
    context.set_alpn_protocols(["h2"])
    problem = _load_trust(context, security) or _load_client_certificate(context, security)
    if problem:
        return problem
    try:
        raw = socket.create_connection((host, port or DEFAULT_TLS_PORT), timeout=timeout_s)
    except OSError:
        return None
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as error:
            return _server_certificate_problem(error, host, security)
        except ssl.SSLError as error:
            return _handshake_problem(error, security)
        except TimeoutError:
            return None                                     # no answer: nothing to name
        except ConnectionError as error:
            return (f"the coordinator closed the connection during the TLS handshake ({error.__class__.__name__}): "
                    f"check that it runs with TLS (--tls-cert/--tls-key)")
        with tls:
            # TLS 1.3 ends the client's handshake before the server has checked the client certificate; a refusal
            # arrives as an alert or a closed connection on the first read. A working gRPC server sends its
            # HTTP/2 SETTINGS right away.
            tls.settimeout(min(timeout_s, 2.0))
            try:
                first = tls.recv(1)
            except TimeoutError:
                return None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                first = b""
            except ssl.SSLError as error:
                return _handshake_problem(error, security)
            except ConnectionError:
                first = b""
            if first:
                return None
            if security.tls_cert:
                return (f"the coordinator closed the connection right after the TLS handshake: it refused this "
                        f"client's certificate --tls-cert {security.tls_cert}; it must be signed by the CA the "
                        f"coordinator trusts (its --tls-ca)")
            return ("the coordinator requires a client certificate (mutual TLS) and closed the connection when this "
                    "client sent none: pass --tls-cert and --tls-key, signed by the coordinator's CA")


def _load_trust(context: ssl.SSLContext, security: ClientSecurity) -> str | None:
    if not security.tls_ca:
        context.load_default_certs()                        # gRPC, too, falls back to well-known roots
        return None
    try:
        context.load_verify_locations(cafile=security.tls_ca)
    except ssl.SSLError as error:                           # an OSError too: catch it first
        return f"the CA file --tls-ca {security.tls_ca} holds no usable PEM certificate ({_reason(error)})"
    except OSError as error:
        return f"cannot read the CA file --tls-ca {security.tls_ca}: {error.strerror or error}"
    return None


def _load_client_certificate(context: ssl.SSLContext, security: ClientSecurity) -> str | None:
    if not security.tls_cert:
        return None
    try:
        context.load_cert_chain(security.tls_cert, security.tls_key)
    except ssl.SSLError as error:                           # an OSError too: catch it first
        if _reason(error) == "KEY_VALUES_MISMATCH":
            return (f"this client's key --tls-key {security.tls_key} does not belong to its certificate "
                    f"--tls-cert {security.tls_cert}: give the key made with that certificate")
        return (f"cannot load this client's certificate --tls-cert {security.tls_cert} and key --tls-key "
                f"{security.tls_key} ({_reason(error)}): both must be PEM files")
    except OSError as error:
        files = f"--tls-cert {security.tls_cert} / --tls-key {security.tls_key}"
        return f"cannot read this client's certificate or key ({files}): {error.strerror or error}"
    return None


def _server_certificate_problem(error: ssl.SSLCertVerificationError, host: str, security: ClientSecurity) -> str:
    code, detail = error.verify_code, error.verify_message
    if code in _UNTRUSTED_ISSUER:
        trusted = (f"the CA in --tls-ca {security.tls_ca}" if security.tls_ca
                   else "the system's CAs (no --tls-ca given)")
        return (f"the coordinator's certificate is signed by a CA this client does not trust ({detail}): it is not "
                f"signed by {trusted}; pass --tls-ca with the CA that signed the coordinator's certificate")
    if code in _NAME_MISMATCH:
        return (f"the coordinator's certificate is not valid for {host}, the host this client dialed: "
                f"dial a name the certificate holds, or regenerate it with `make certs SERVER_NAMES={host}`")
    if code == _EXPIRED:
        return ("the coordinator's certificate has expired: issue a new one (make certs) and restart the "
                "coordinator with it")
    if code == _NOT_YET_VALID:
        return ("the coordinator's certificate is not yet valid: check the clocks of both hosts, or issue a "
                "certificate valid from now")
    if code == _INVALID_PURPOSE:
        return (f"the coordinator's certificate is not meant for a TLS server ({detail}): it needs "
                f"extendedKeyUsage=serverAuth, as make certs writes it")
    return f"the coordinator's certificate failed verification: {detail} (OpenSSL code {code})"


def _handshake_problem(error: ssl.SSLError, security: ClientSecurity) -> str:
    reason = _reason(error)
    if not security.tls_cert and reason in _CERTIFICATE_REQUIRED:
        return (f"the coordinator requires a client certificate (mutual TLS) and this client gave none ({reason}): "
                f"pass --tls-cert and --tls-key, signed by the coordinator's CA")
    if security.tls_cert and reason in _CERTIFICATE_REFUSED:
        return (f"the coordinator refused this client's certificate --tls-cert {security.tls_cert} as "
                f"{_CERTIFICATE_REFUSED[reason]} ({reason}): it must be signed by the CA the coordinator trusts "
                f"(its --tls-ca)")
    if reason in _NOT_TLS or isinstance(error, ssl.SSLEOFError):
        return (f"the coordinator does not answer with TLS ({reason}): it probably runs without --tls-cert; "
                f"start it with TLS, or dial it without --tls-ca")
    return f"the TLS handshake failed: {reason}"


def _reason(error: ssl.SSLError) -> str:
    return error.reason or (error.strerror or str(error))
