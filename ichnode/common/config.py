"""One typed configuration for every part of ichnode, validated at start.

Keys are grouped in sections (TOML tables) by the part they configure; README "Configuration"
lists each with its meaning. Sources, later ones winning: the built-in defaults, a TOML file
(``--config`` or ``ICHNODE_CONFIG``), then one environment variable per key. Environment names are
those of the flat configuration the sections replaced: ``ICHNODE_`` + the former key in upper case
(``listener.port`` -> ``ICHNODE_PORT``, ``http.port`` -> ``ICHNODE_HTTP_PORT``), so existing
deployments keep working. List values in the environment are comma-separated.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

import pydicom.uid

from ichnode.common.result_folder import ResultFolder
from ichnode.common.uids import path_name
from ichnode.common.vocabulary import Level

ENV_PREFIX = "ICHNODE_"
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars of the default repertoire, no backslash


class ConfigError(Exception):
    """An invalid configuration value; the message names the key."""


def sop_class_uid(name: str) -> str:
    """A SOP Class UID, or pydicom's keyword for one (``SegmentationStorage``), as its UID."""
    uid = pydicom.uid.UID(name) if re.fullmatch(r"\d+(\.\d+)+", name) else getattr(pydicom.uid, name, None)
    if not isinstance(uid, pydicom.uid.UID) or not uid.is_valid or (uid.type and uid.type != "SOP Class"):
        raise ValueError(f"{name!r} is neither a SOP Class UID nor a SOP class keyword such as SegmentationStorage")
    return str(uid)


class Destination(BaseModel):
    """A DICOM peer written as ``AET@host:port``, or ``tls:AET@host:port`` for DICOM TLS (PS3.15 B.1),
    optionally followed by the SOP classes it takes:
    ``AET@host:port?sop_classes=Comprehensive3DSRStorage+KeyObjectSelectionDocumentStorage``
    (pydicom keywords or UIDs, ``+`` between them). Without, every result object goes to it."""

    model_config = ConfigDict(frozen=True)
    ae_title: str
    host: str
    port: int
    tls: bool = False
    sop_classes: frozenset[str] = frozenset()  # UIDs; empty: all

    @classmethod
    def parse(cls, text: str) -> "Destination":
        match = re.fullmatch(r"\s*(tls:)?([^@]{1,16})@([^:@\s]+):(\d{1,5})(?:\?sop_classes=([^\s]+))?\s*", text)
        if not match:
            raise ValueError(f"{text!r} is not [tls:]AET@host:port[?sop_classes=A+B]")
        aet, host, port = match.group(2).strip(), match.group(3), int(match.group(4))
        if not _AET.match(aet):
            raise ValueError(f"{aet!r} is not a valid AE title")
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range 1-65535")
        classes = frozenset(sop_class_uid(name) for name in (match.group(5) or "").split("+") if name)
        return cls(ae_title=aet, host=host, port=port, tls=bool(match.group(1)), sop_classes=classes)

    def takes(self, sop_class: str) -> bool:
        """Whether objects of this SOP class go to this destination."""
        return not self.sop_classes or sop_class in self.sop_classes

    def __str__(self) -> str:
        """The address (the outbox's target), without the SOP classes."""
        return f"{'tls:' if self.tls else ''}{self.ae_title}@{self.host}:{self.port}"


class StowEndpoint(BaseModel):
    """A DICOMweb archive written as ``stow:https://host/dicom-web`` (the base URL before /studies)."""

    model_config = ConfigDict(frozen=True)
    url: str

    @classmethod
    def parse(cls, text: str) -> "StowEndpoint":
        url = text.strip().removeprefix("stow:").rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"{text!r} is not stow:http(s)://host[:port]/path")
        if parts.username or parts.password:
            raise ValueError(f"{parts.hostname}: credentials do not belong in the URL, set stow_username and "
                             "stow_password or stow_token")
        return cls(url=url)

    def __str__(self) -> str:
        return f"stow:{self.url}"


def parse_destination(text: str) -> Destination | StowEndpoint:
    """``stow:<url>`` is a DICOMweb archive, anything else a DICOM peer ``AET@host:port``."""
    return StowEndpoint.parse(text) if text.strip().startswith("stow:") else Destination.parse(text)


class HostPort(BaseModel):
    """A TCP endpoint written as ``host:port`` (HL7 MLLP listeners)."""

    model_config = ConfigDict(frozen=True)
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "HostPort":
        match = re.fullmatch(r"\s*([^:\s]+):(\d{1,5})\s*", text)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise ValueError(f"{text!r} is not host:port")
        return cls(host=match.group(1), port=int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


Port = Annotated[int, Field(ge=1, le=65535)]


class Section(BaseModel):
    """One TOML table of the configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: The flat key each renamed field had before the sections (it names its environment variable).
    former_keys: ClassVar[dict[str, str]] = {}


class ListenerSection(Section):
    """[listener]: the DICOM listener."""

    ae_title: str = "ICHNODE"
    bind: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[str] = []  # empty: any calling AE title is accepted
    check_called_aet: bool = True  # refuse associations addressed to another AE title than ae_title
    max_associations: int = Field(default=16, ge=1)  # negotiated associations; idle TCP connections do not count
    acse_timeout_seconds: float = Field(default=10.0, gt=0, le=600)  # a connection must negotiate within this
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)  # longest wait for the next DIMSE message
    network_timeout_seconds: float = Field(default=60.0, gt=0)  # an association silent this long is aborted
    # DICOM TLS (PS3.15 B.1, TLS 1.2+): this node's certificate and key (PEM), also presented by delivery to
    # tls: destinations; tls_ca: the CAs that peers' certificates are verified against, both ways (None: the
    # listener does not ask for a client certificate, delivery checks servers against the system's CA store)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_port: Port = 2762
    plain_port_enabled: bool = True  # false: only the TLS port listens
    # C-STORE and STOW-RS: take every storage SOP class of a forwarded study; only CT images are analysed
    accept_all_storage: bool = True
    other_objects: Literal["discard", "keep"] = "discard"  # those others: counted only, or kept in the spool
    # the largest P-DATA PDU the node accepts (0: no limit); senders cut data sets into PDUs of this size
    max_pdu_bytes: int = 262_144

    @field_validator("max_pdu_bytes")
    @classmethod
    def _check_pdu(cls, value: int) -> int:
        if value != 0 and not 4096 <= value <= 0xFFFFFFFF:
            raise ValueError("must be 0 (no limit) or 4096 to 4294967295 bytes")
        return value

    @field_validator("ae_title")
    @classmethod
    def _check_aet(cls, value: str) -> str:
        if not _AET.match(value) or value.strip() != value:
            raise ValueError("must be 1-16 characters, no backslash, no leading or trailing space")
        return value

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, value: list[str]) -> list[str]:
        for aet in value:
            if not _AET.match(aet):
                raise ValueError(f"{aet!r} is not a valid AE title")
        return value

    @field_validator("tls_cert", "tls_key", "tls_ca")
    @classmethod
    def _check_pem_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> "ListenerSection":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if not self.plain_port_enabled and not self.tls:
            raise ValueError("plain_port_enabled = false needs tls_cert and tls_key (nothing would listen)")
        if self.tls and self.plain_port_enabled and self.tls_port == self.port:
            raise ValueError(f"tls_port and port are both {self.port}")
        return self

    @property
    def tls(self) -> bool:
        """The TLS port is served (and delivery can present this node's certificate)."""
        return self.tls_cert is not None


class StorageSection(Section):
    """[storage]: where everything lives (a path shared with remote workers) and for how long."""

    data_dir: Path = Path("var")
    retention_days: float = Field(default=7.0, ge=0)  # spooled instances and results kept after analysis; 0 = forever
    # below this much free space on data_dir's file system, instances are refused (0xA700) until there is
    # again; the default leaves room for two large studies (thin-slice multi-reconstruction head CT: ~1 GB each)
    min_free_mb: float = Field(default=2048.0, ge=0)

    @property
    def min_free_bytes(self) -> int:
        return int(self.min_free_mb * 1024 * 1024)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "ichnode.sqlite3"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def result_folder(self, series_uid: str) -> ResultFolder:
        return ResultFolder(self.results_dir / path_name(series_uid))


class SeriesSection(Section):
    """[series]: when a series is complete and which series are worth analysing."""

    quiet_seconds: float = Field(default=10.0, gt=0, le=3600)
    min_slices: int = Field(default=16, ge=1)
    min_coverage_mm: float = Field(default=80.0, ge=0)
    # contrast-enhanced series (headers or images): False skips them, True analyses them with a warning
    analyse_contrast: bool = False


class QueueSection(Section):
    """[queue]: the broker between node and workers."""

    broker_url: str = ""  # empty: embedded broker in data_dir; redis://host:port/db for Redis
    workers: int = Field(default=1, ge=0)  # worker processes `serve` starts
    task_timeout_seconds: float = Field(default=900.0, gt=0)  # analysing longer than this is re-queued

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be empty (embedded broker) or a redis:// URL")
        return value


class DetectorSection(Section):
    """[detector]: the model the workers run."""

    model_path: Path | None = None  # None: the shipped ensemble
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads of each worker's model; 0: the machine's cores, shared out among the workers that
    # `ichnode serve` starts (a worker with every core each would have them fight over the cores)
    cpu_threads: int = Field(default=0, ge=0)


class PriorityRule(Section):
    """[priority]: the thresholds of the worklist priority rule that worker.priority applies."""

    stat_probability: float = Field(default=0.66, ge=0, le=1)  # the shipped model's CV operating point (MODEL_CARD.md)
    urgent_probability: float = Field(default=0.27, ge=0, le=1)
    stat_volume_ml: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _check_order(self) -> "PriorityRule":
        if self.urgent_probability > self.stat_probability:
            raise ValueError(f"urgent_probability {self.urgent_probability} is above stat_probability "
                             f"{self.stat_probability}")
        return self


class DeliverySection(Section):
    """[delivery]: result objects to PACS (C-STORE) or a DICOMweb archive (STOW-RS), through the
    persistent outbox."""

    former_keys: ClassVar[dict[str, str]] = {"max_backoff_seconds": "delivery_max_backoff_seconds",
                                             "max_attempts": "delivery_max_attempts"}
    destinations: list[Destination | StowEndpoint] = []
    max_backoff_seconds: float = Field(default=300.0, gt=0)
    # attempts for an object the destination answers with a failure status that may pass (0xA7xx out of
    # resources, 0x0110 processing failure, ...); then it is failed. Refusals that cannot pass fail at once.
    max_attempts: int = Field(default=5, ge=1)
    # credentials and trust for stow: destinations (never logged)
    stow_token: SecretStr = SecretStr("")  # sent as `Authorization: Bearer <token>`
    stow_password: SecretStr = SecretStr("")
    stow_username: str = Field(default="", validate_default=True)  # with stow_password: HTTP basic authentication
    stow_ca_bundle: Path | None = None  # PEM file of CAs for https; None: the system's CA store

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value):
        return [parse_destination(v) if isinstance(v, str) else v for v in value]

    @field_validator("stow_username")
    @classmethod
    def _check_stow_credentials(cls, value: str, info: ValidationInfo) -> str:
        token, password = info.data.get("stow_token"), info.data.get("stow_password")
        if value and token and token.get_secret_value():
            raise ValueError("set either stow_token or stow_username/stow_password, not both")
        if not value and password and password.get_secret_value():
            raise ValueError("stow_password is set but stow_username is empty")
        return value

    @field_validator("stow_ca_bundle")
    @classmethod
    def _check_ca_bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value


class Hl7Section(Section):
    """[hl7]: ORU^R01 to the RIS over MLLP."""

    former_keys: ClassVar[dict[str, str]] = {"endpoints": "hl7_endpoints", "sending_facility": "hl7_sending_facility"}
    endpoints: list[HostPort] = []
    sending_facility: str = "ICHNODE"

    @field_validator("endpoints", mode="before")
    @classmethod
    def _parse_endpoints(cls, value):
        return [HostPort.parse(v) if isinstance(v, str) else v for v in value]


class WebhookSection(Section):
    """[webhook]: JSON POSTs per result (chat, paging, ...)."""

    former_keys: ClassVar[dict[str, str]] = {
        "urls": "webhooks", "min_level": "webhook_min_level", "include_patient": "webhook_include_patient"}
    urls: list[str] = []
    min_level: Level = "URGENT"
    include_patient: bool = False  # include patient name/id in webhook payloads

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value


class HttpSection(Section):
    """[http]: the HTTP API and the worklist page."""

    former_keys: ClassVar[dict[str, str]] = {"bind": "http_bind", "port": "http_port"}
    bind: str = "127.0.0.1"
    port: Port = 8080
    api_token: str = ""  # when set, the API needs `Authorization: Bearer <token>`
    public_url: str = ""  # how users reach the web page, for links in webhooks (e.g. https://ichnode.hospital.org)


class AuditSection(Section):
    """[audit]: the audit trail, one JSON line per event in data_dir/audit.log."""

    syslog: str = ""  # also send each event to syslog: a socket path (/dev/log) or udp host:port; empty: file only

    @field_validator("syslog")
    @classmethod
    def _check_syslog(cls, value: str) -> str:
        if value and not value.startswith("/"):
            HostPort.parse(value)
        return value


class Settings(BaseModel):
    """Every key of ichnode: one section per part, and the log level."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listener: ListenerSection = ListenerSection()
    storage: StorageSection = StorageSection()
    series: SeriesSection = SeriesSection()
    queue: QueueSection = QueueSection()
    detector: DetectorSection = DetectorSection()
    priority: PriorityRule = PriorityRule()
    delivery: DeliverySection = DeliverySection()
    hl7: Hl7Section = Hl7Section()
    webhook: WebhookSection = WebhookSection()
    http: HttpSection = HttpSection()
    audit: AuditSection = AuditSection()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def unsafe(self) -> list[str]:
        """Each setting in force that lets anyone send studies, read patient data or see it in transit;
        the node warns of each at start (README "Production checklist")."""
        found = []
        listener, http = self.listener, self.http
        if listener.plain_port_enabled and not is_loopback(listener.bind):
            found.append(f"listener port {listener.port} on {listener.bind} is plain DICOM without TLS (set tls_cert "
                         "and tls_key, then plain_port_enabled = false)")
        if not listener.allowed_calling_aets and not is_loopback(listener.bind):
            found.append(f"listener.allowed_calling_aets is empty: any calling AE title that reaches {listener.bind} "
                         "may send")
        if listener.tls and listener.tls_ca is None:
            found.append("listener.tls_ca is not set: TLS peers are not asked for a certificate")
        if not http.api_token:
            found.append(f"http.api_token is empty: the API and worklist serve patient data without a token on "
                         f"{http.bind}:{http.port}")
        if not is_loopback(http.bind):
            found.append(f"http.bind is {http.bind}: plain HTTP beyond this machine (put a TLS proxy in front)")
        for destination in self.delivery.destinations:
            plain = (destination.url.startswith("http://") if isinstance(destination, StowEndpoint)
                     else not destination.tls)
            host = urlsplit(destination.url).hostname if isinstance(destination, StowEndpoint) else destination.host
            if plain and not is_loopback(host):
                found.append(f"delivery destination {destination} is not encrypted")
        if self.webhook.include_patient and self.webhook.urls:
            found.append("webhook.include_patient is on: patient names and IDs go to the webhook URLs")
        return found


def is_loopback(host: str) -> bool:
    """True for an address (or localhost) that only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sections() -> dict[str, type[Section]]:
    """Section name -> its model."""
    return {name: field.annotation for name, field in Settings.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section)}


def environment_variables() -> dict[str, tuple[str, ...]]:
    """Each key's environment variable -> the key (section, name), or (name,) outside sections."""
    names: dict[str, tuple[str, ...]] = {}
    for name in Settings.model_fields:
        section = sections().get(name)
        if section is None:
            names[ENV_PREFIX + name.upper()] = (name,)
            continue
        for key in section.model_fields:
            names[ENV_PREFIX + section.former_keys.get(key, key).upper()] = (name, key)
    return names


def _field(path: tuple[str, ...]):
    model = sections()[path[0]] if len(path) == 2 else Settings
    return model.model_fields[path[-1]]


def _from_env(environ: dict[str, str]) -> dict[tuple[str, ...], object]:
    values: dict[tuple[str, ...], object] = {}
    for variable, path in environment_variables().items():
        raw = environ.get(variable)
        if raw is None:
            continue
        annotation = _field(path).annotation
        if get_origin(annotation) is list:
            values[path] = [item.strip() for item in raw.split(",") if item.strip()]
        elif raw == "" and _optional(annotation):  # no model path, no CA bundle
            values[path] = None
        else:
            values[path] = raw
    return values


def _optional(annotation) -> bool:
    """A key that may be None (written empty in the environment)."""
    return type(None) in get_args(annotation)


def _redact(text: str) -> str:
    """Masks the credentials of URLs (scheme://user:password@host) in a config error."""
    return re.sub(r"//[^/@\s]+@", "//***@", text)


def _former_location(key: str) -> str | None:
    """Where a flat key of the configuration before sections lives now, e.g. '[listener] port'."""
    for name, section in sections().items():
        for field in section.model_fields:
            if section.former_keys.get(field, field) == key:
                return f"[{name}] {field}"
    return None


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; ConfigError naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file, then the environment. Raises ConfigError naming the key."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    values = read_toml(path) if path else {}
    env_values = _from_env(environ)
    for key_path, value in env_values.items():
        if len(key_path) == 2 and isinstance(values.get(key_path[0]), dict):
            values[key_path[0]] = dict(values[key_path[0]], **{key_path[1]: value})
        elif len(key_path) == 2:
            values[key_path[0]] = {key_path[1]: value}
        else:
            values[key_path[0]] = value
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], path, env_values)) from None


def _describe(error: dict, path, env_values: dict[tuple[str, ...], object]) -> str:
    """One line naming the key (its environment variable when it came from there) and the problem."""
    loc = tuple(str(part) for part in error["loc"])
    key_path = loc[:2] if loc and loc[0] in sections() else loc[:1]
    dotted = ".".join(key_path)
    if error["type"] == "extra_forbidden":
        moved = _former_location(dotted) if len(key_path) == 1 else None
        return f"config key {dotted!r} (in {path}): " + (f"moved to {moved}" if moved else "unknown key")
    if len(loc) == 1 and loc[0] in sections():  # a rule across the section's keys: its message names them
        given = [name for name, key in environment_variables().items() if key in env_values and key[0] == loc[0]]
        where = ", ".join(given) if given else f"in {path or 'defaults'}"
        return f"config [{loc[0]}] ({where}): {error['msg']}"
    variable = next((name for name, key in environment_variables().items() if key == key_path), None)
    origin = variable if key_path in env_values else f"{dotted} (in {path or 'defaults'})"
    return f"config {origin}: {error['msg']} (got {_redact(repr(error.get('input')))})"
