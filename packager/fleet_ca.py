"""The fleet CA: a certificate per device and per controller, and the broker that trusts only those.

Layout under ``EDGEDEPLOY_HOME/fleet/ca/`` (the folder is mode 0700)::

    ca.key            the CA's private key (PEM, PKCS#8, mode 0600): it never leaves this machine
    ca.crt            its self-signed certificate: what the broker and every client trust
    identities.json   each name given a certificate: role (device or controller), serial, expiry

Keys are ECDSA P-256 unless ``ca init --key-type ed25519``; a CA's certificates then carry keys
of its own type. Mosquitto 2.0.11 on OpenSSL 3.0 and Python's ``ssl`` take both (tested); P-256
is the default because every broker's TLS stack takes it, TLS 1.2 ones included.

The broker (:func:`mosquitto_config`) requires a client certificate from this CA and, with
``use_identity_as_username``, takes its common name as the user name. A device's certificate
names its device id (checked as :func:`edge_agent.fleet_messages.check_device_id` does); the ACL
(:func:`broker_acl`) lets each user name read only its own ``desired`` and ``requests`` topics and
write only its own ``reported``, ``status``, ``telemetry``, ``events`` and ``responses``, through
Mosquitto ``pattern`` lines with ``%u``, so enrolling a device needs no broker change. A
controller's name is listed under ``user`` with every topic of the prefix. A name has one role
for good: a device is never enrolled under a controller's name, nor the reverse, or it would get
every topic. Client certificates are for client authentication only and the broker's for server
authentication only, so neither can stand in for the other. A certificate stays valid until it
expires (there is no revocation list): keep device certificates short-lived (``--days``).
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.atomic import atomic_write_bytes, atomic_write_json, read_json
from edge_agent.errors import AlreadyExistsError, NotFoundError, UsageError, ValidationError
from edge_agent.fleet_messages import DEFAULT_PREFIX, check_device_id
from edge_agent.home import edgedeploy_home

__all__ = [
    "DEVICE_READS",
    "DEVICE_WRITES",
    "KEY_TYPES",
    "Enrollment",
    "FleetCA",
    "broker_acl",
    "mosquitto_config",
]

KEY_TYPES = ("p256", "ed25519")
DEVICE_READS = ("desired", "requests")  # what a device may receive, on its own topics only
DEVICE_WRITES = ("reported", "status", "telemetry", "events", "responses")  # what it may publish there
_BROKER_CN = "edgedeploy broker"  # a space: no device id or controller name can be this user name
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9][A-Za-z0-9-]{0,62}(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})*$")


def _new_key(key_type: str) -> CertificateIssuerPrivateKeyTypes:
    if key_type == "ed25519":
        return Ed25519PrivateKey.generate()
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise UsageError(f"unknown key type {key_type!r}: use {' or '.join(KEY_TYPES)}")


def _pem_key(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _check_days(days: int) -> int:
    if days < 1:
        raise UsageError(f"--days must be at least 1, not {days}")
    return days


def _san(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        pass
    if not _HOSTNAME.match(hostname):
        raise UsageError(f"bad --hostname {hostname!r}: give a DNS name or an IP address devices connect to")
    return x509.DNSName(hostname)


@dataclass(frozen=True)
class Enrollment:
    """One issued client identity and where its files were written."""

    name: str
    role: str  # "device" or "controller"
    certificate: Path
    key: Path
    ca: Path
    serial: str
    not_after: str

    def agent_yaml(self, broker: str) -> str:
        """The agent.yaml lines for these files, for an agent.yaml in the same folder (agent.yaml
        paths are relative to its own folder)."""
        return (f"broker: {broker}\nca_file: {self.ca.name}\ntls_cert: {self.certificate.name}\n"
                f"tls_key: {self.key.name}\n")

    def to_dict(self) -> dict[str, str]:
        """JSON form (``fleet enroll --json``)."""
        return {"name": self.name, "role": self.role, "certificate": str(self.certificate), "key": str(self.key),
                "ca": str(self.ca), "serial": self.serial, "not_after": self.not_after}


class FleetCA:
    """The CA under ``home/fleet/ca`` (``home`` defaults to ``$EDGEDEPLOY_HOME``)."""

    def __init__(self, home: Path | None = None) -> None:
        self.folder = (home or edgedeploy_home()) / "fleet" / "ca"
        self.key_path = self.folder / "ca.key"
        self.cert_path = self.folder / "ca.crt"
        self._identities = self.folder / "identities.json"

    # -- the CA itself -------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        """True once ``ca init`` ran here."""
        return self.cert_path.is_file() and self.key_path.is_file()

    def init(self, common_name: str = "edgedeploy fleet CA", days: int = 3650, key_type: str = "p256") -> None:
        """Create the CA; AlreadyExistsError when there is one (its certificates would stop verifying)."""
        if self.exists:
            raise AlreadyExistsError(f"a fleet CA exists already ({self.cert_path}); every certificate it "
                                     "issued would stop working with a new one")
        key = _new_key(key_type)
        name = _name(common_name)
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                encipher_only=False, decipher_only=False), critical=True))
        certificate = self._sign(builder, key.public_key(), key, _check_days(days))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        atomic_write_bytes(self.key_path, _pem_key(key), mode=0o600)
        atomic_write_bytes(self.cert_path, _pem_cert(certificate))

    def _load(self) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
        if not self.exists:
            raise NotFoundError("no fleet CA here yet: run `edgedeploy fleet ca init` (once, on the machine "
                                "that keeps the CA key)")
        certificate = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ValidationError(f"{self.key_path} is not an ECDSA or ed25519 key")
        return certificate, key

    @staticmethod
    def _sign(builder: x509.CertificateBuilder, public_key: Any, issuer_key: CertificateIssuerPrivateKeyTypes,
              days: int, issuer: x509.Certificate | None = None) -> x509.Certificate:
        now = _now()
        builder = (builder.public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))  # a device clock a little behind
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        algorithm = None if isinstance(issuer_key, Ed25519PrivateKey) else hashes.SHA256()
        return builder.sign(issuer_key, algorithm)

    def _issue(self, common_name: str, days: int, usage: x509.ObjectIdentifier,
               sans: list[x509.GeneralName] | None = None) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
        ca_cert, ca_key = self._load()
        key = _new_key("ed25519" if isinstance(ca_key, Ed25519PrivateKey) else "p256")
        builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return self._sign(builder, key.public_key(), ca_key, _check_days(days), ca_cert), key

    def show(self) -> dict[str, Any]:
        """The CA's certificate and every identity it issued (``fleet ca show --json``)."""
        certificate, key = self._load()
        return {"subject": certificate.subject.rfc4514_string(),
                "key_type": "ed25519" if isinstance(key, Ed25519PrivateKey) else "p256",
                "sha256": certificate.fingerprint(hashes.SHA256()).hex(),
                "not_before": certificate.not_valid_before_utc.isoformat(),
                "not_after": certificate.not_valid_after_utc.isoformat(),
                "certificate": str(self.cert_path),
                "identities": [{"name": n, **v} for n, v in sorted(self.identities().items())]}

    # -- identities ----------------------------------------------------------------------------
    def identities(self) -> dict[str, dict[str, str]]:
        """Name -> ``{"role", "serial", "not_after"}`` of every enrolled device and controller."""
        return read_json(self._identities) if self._identities.is_file() else {}

    def controllers(self) -> list[str]:
        """The names enrolled as controllers (the ACL gives them every topic)."""
        return sorted(n for n, v in self.identities().items() if v["role"] == "controller")

    @contextmanager
    def _registry(self) -> Iterator[dict[str, dict[str, str]]]:
        """The identities, locked for one change (two enrollments at once must not lose one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "identities.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            identities = self.identities()
            yield identities
            atomic_write_json(self._identities, identities)

    def enroll(self, name: str, out_dir: Path, days: int = 365, role: str = "device") -> Enrollment:
        """Issue a client certificate for device id (or controller name) ``name`` into ``out_dir``.

        Writes ``<role>.crt``, ``<role>.key`` (mode 0600) and ``ca.crt``. Enrolling the same name
        again issues a new certificate (the old one stays valid until it expires).
        """
        if role not in ("device", "controller"):
            raise UsageError(f"unknown role {role!r}: device or controller")
        try:
            check_device_id(name)
        except ValidationError as exc:
            raise UsageError(f"{exc} (a certificate name is a device id or a controller name)") from None
        out_dir = Path(out_dir)
        self._load()  # no CA: say so before anything is written
        with self._registry() as identities:
            held = identities.get(name, {}).get("role")
            if held not in (None, role):
                raise UsageError(f"{name!r} is enrolled as a {held}; a {role} needs another name "
                                 "(one name, one role: the ACL grants by name)")
            certificate, key = self._issue(name, days, ExtendedKeyUsageOID.CLIENT_AUTH)
            enrollment = Enrollment(name, role, out_dir / f"{role}.crt", out_dir / f"{role}.key", out_dir / "ca.crt",
                                    format(certificate.serial_number, "x"),
                                    certificate.not_valid_after_utc.isoformat())
            atomic_write_bytes(enrollment.key, _pem_key(key), mode=0o600)
            atomic_write_bytes(enrollment.certificate, _pem_cert(certificate))
            atomic_write_bytes(enrollment.ca, self.cert_path.read_bytes())
            identities[name] = {"role": role, "serial": enrollment.serial, "not_after": enrollment.not_after}
        return enrollment

    # -- the broker ----------------------------------------------------------------------------
    def write_broker_config(self, out_dir: Path, hostnames: list[str], port: int = 8883, bind: str | None = None,
                            prefix: str = DEFAULT_PREFIX, install_dir: Path | None = None,
                            days: int = 825) -> list[Path]:
        """Write the broker's files into ``out_dir``: ``ca.crt``, ``server.crt``, ``server.key`` (0600),
        ``acl`` and ``mosquitto.conf`` (naming them under ``install_dir``, default ``out_dir``)."""
        if not hostnames:
            raise UsageError("give the broker's host name or address: --hostname H (repeatable)")
        if not 0 < port < 65536:
            raise UsageError(f"--port {port} is not a TCP port")
        certificate, key = self._issue(_BROKER_CN, days, ExtendedKeyUsageOID.SERVER_AUTH,
                                       [_san(h) for h in hostnames])
        out_dir = Path(out_dir)
        files = {"ca.crt": self.cert_path.read_bytes(), "server.crt": _pem_cert(certificate),
                 "acl": broker_acl(prefix, self.controllers()).encode(),
                 "mosquitto.conf": mosquitto_config(Path(install_dir or out_dir.resolve()), port, bind).encode()}
        atomic_write_bytes(out_dir / "server.key", _pem_key(key), mode=0o600)
        for name, data in files.items():
            atomic_write_bytes(out_dir / name, data)
        return [out_dir / name for name in ("server.key", *files)]


def broker_acl(prefix: str = DEFAULT_PREFIX, controllers: list[str] | tuple[str, ...] = ()) -> str:
    """The Mosquitto ACL file: controllers get every topic under ``prefix``, each device its own only.

    Anonymous clients get no line, hence nothing (and the broker config refuses them anyway).
    """
    if not prefix or any(c in prefix for c in "+#") or prefix.startswith("$"):
        raise UsageError(f"bad topic prefix {prefix!r}: no '+', '#' or leading '$'")
    lines = ["# edgedeploy fleet ACL, from `edgedeploy fleet acl` / `fleet broker-config`. The user name is the",
             "# client certificate's common name (use_identity_as_username); anonymous clients get nothing.", ""]
    for name in controllers:
        lines += [f"user {check_device_id(name)}", f"topic readwrite {prefix}/#", ""]
    lines += ["# every device (%u: its own device id): its own topics, nothing else"]
    lines += [f"pattern read {prefix}/devices/%u/{kind}" for kind in DEVICE_READS]
    lines += [f"pattern write {prefix}/devices/%u/{kind}" for kind in DEVICE_WRITES]
    return "\n".join(lines) + "\n"


def mosquitto_config(folder: Path, port: int = 8883, bind: str | None = None) -> str:
    """A Mosquitto listener that takes only clients with a certificate of the fleet CA, under the ACL.

    ``folder`` is where ``ca.crt``, ``server.crt``, ``server.key`` and ``acl`` lie on the broker.
    """
    return "\n".join([
        "# edgedeploy fleet broker, from `edgedeploy fleet broker-config`: TLS with a certificate per client.",
        "# Put it in /etc/mosquitto/conf.d/ or run `mosquitto -c` on it. allow_anonymous and acl_file apply",
        "# to every listener while per_listener_settings is false (Mosquitto's default).",
        f"listener {port}" + (f" {bind}" if bind else ""),
        f"cafile {folder}/ca.crt",
        f"certfile {folder}/server.crt",
        f"keyfile {folder}/server.key",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {folder}/acl",
        "",
    ])
