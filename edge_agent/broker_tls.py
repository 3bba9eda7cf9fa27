"""A fleet client's TLS identity for ``mqtts://`` brokers: checked before use, explained when refused.

:class:`BrokerTLS` holds the files of one connection: the CA that signed the broker's certificate
(none: the system's CAs) and the client's own certificate and key (from ``edgedeploy fleet
enroll``). With mutual TLS the broker takes the certificate's common name as the client's user
name (Mosquitto ``use_identity_as_username``) and its ACL gives that name its topics only.
:meth:`BrokerTLS.check` reads every file and says in one line what is wrong (missing, unreadable,
not PEM, an encrypted key, a key that is not the certificate's, a certificate out of its validity
dates), so ``edge-agent --check`` and the controller fail before connecting, not with a TLS alert
later. Messages name files, never their contents.

:func:`tls_refusal` says why a TLS connection fails: paho retries in silence, and under TLS 1.3 a
broker refuses a client certificate only after the client's side of the handshake completed, so
the refusal arrives as an alert on the first read. :func:`redact_url` hides the password of a
broker URL in every message and log line.
"""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from edge_agent.errors import ValidationError

__all__ = ["AGENT_NAMES", "BrokerTLS", "redact_url", "tls_refusal"]

log = logging.getLogger(__name__)

AGENT_NAMES = ("ca_file", "tls_cert", "tls_key")  # what messages call the three files (agent.yaml keys)
_PROBE_S = 3.0  # how long a refused certificate's alert may take to arrive after the handshake


def _read(path: Path, label: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValidationError(f"{label} {path} does not exist") from None
    except OSError as exc:
        raise ValidationError(f"{label} {path} cannot be read ({exc.strerror or exc})") from None


def _certificates(path: Path, label: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read(path, label))
    except ValueError:
        certificates = []
    if not certificates:
        raise ValidationError(f"{label} {path} holds no PEM certificate")
    return certificates


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class BrokerTLS:
    """The CA file, client certificate and client key of one ``mqtts://`` connection (each optional)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    names: tuple[str, str, str] = field(default=AGENT_NAMES, compare=False)  # for messages

    def check(self) -> None:
        """Read and cross-check the files; ValidationError names the first problem."""
        ca_name, cert_name, key_name = self.names
        if (self.cert_file is None) != (self.key_file is None):
            raise ValidationError(f"{cert_name} and {key_name} go together: give both or neither")
        if self.ca_file is not None:
            _certificates(self.ca_file, ca_name)
        if self.cert_file is not None and self.key_file is not None:
            self._check_pair(self.cert_file, self.key_file)

    def _check_pair(self, cert_file: Path, key_file: Path) -> None:
        _, cert_name, key_name = self.names
        certificate = _certificates(cert_file, cert_name)[0]
        try:
            key = serialization.load_pem_private_key(_read(key_file, key_name), password=None)
        except TypeError:
            raise ValidationError(f"{key_name} {key_file} is encrypted; give the unencrypted key "
                                  "(kept at mode 0600)") from None
        except ValueError:
            raise ValidationError(f"{key_name} {key_file} holds no PEM private key") from None
        if _spki(key.public_key()) != _spki(certificate.public_key()):
            raise ValidationError(f"{key_name} {key_file} is not the key of {cert_name} {cert_file}")
        now = datetime.datetime.now(datetime.UTC)
        if certificate.not_valid_after_utc < now:
            raise ValidationError(f"{cert_name} {cert_file} expired on {certificate.not_valid_after_utc:%Y-%m-%d}; "
                                  "enroll again (edgedeploy fleet enroll)")
        if certificate.not_valid_before_utc > now:
            raise ValidationError(f"{cert_name} {cert_file} is valid from {certificate.not_valid_before_utc} only; "
                                  "check this machine's clock")
        if Path(key_file).stat().st_mode & 0o077:
            log.warning("%s %s can be read by other users; chmod 600 it", key_name, key_file)

    def identity(self) -> str | None:
        """The common name of the client certificate (what the broker takes as the user name), or None."""
        if self.cert_file is None:
            return None
        names = _certificates(self.cert_file, self.names[1])[0].subject.get_attributes_for_oid(
            x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker (by ``ca_file``, else the system's CAs) and
        presents the client certificate when there is one. Call :meth:`check` first for clear errors."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


def _words(error: ssl.SSLError) -> str:
    return str(error.reason or error).lower().replace("_", " ")


def tls_refusal(host: str, port: int, context: ssl.SSLContext, timeout: float = _PROBE_S) -> str | None:
    """Why a TLS connection to ``host:port`` with ``context`` fails, as a sentence; None when TLS is
    not the reason (it works, or nothing listens there)."""
    try:
        with socket.create_connection((host, port), timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(timeout)
            tls.recv(1)  # a refused client certificate comes as an alert here (TLS 1.3)
    except ssl.SSLCertVerificationError as exc:
        return (f"the broker's certificate is not trusted ({exc.verify_message}): "
                "the CA file must hold the CA that signed it")
    except ssl.SSLError as exc:
        return (f"the broker refused the TLS connection ({_words(exc)}): it takes only certificates "
                "of its CA (edgedeploy fleet enroll), with their key")
    except OSError:  # TimeoutError included: the broker waits for the MQTT CONNECT, so TLS holds
        return None
    return None


def redact_url(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostport}"))
