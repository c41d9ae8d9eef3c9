"""One typed configuration for every part of the node, validated at start.

Sources, later ones winning: the built-in defaults, a TOML file (``--config`` or
``ICHNODE_CONFIG``), then one environment variable per key: ``ICHNODE_`` + the key in upper case
(``port`` -> ``ICHNODE_PORT``). List values in the environment are comma-separated.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

ENV_PREFIX = "ICHNODE_"
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars of the default repertoire, no backslash


class ConfigError(Exception):
    """An invalid configuration value; the message names the key."""


class Destination(BaseModel):
    """A DICOM peer written as ``AET@host:port``."""

    model_config = ConfigDict(frozen=True)
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        match = re.fullmatch(r"\s*([^@]{1,16})@([^:@\s]+):(\d{1,5})\s*", text)
        if not match:
            raise ValueError(f"{text!r} is not AET@host:port")
        aet, host, port = match.group(1).strip(), match.group(2), int(match.group(3))
        if not _AET.match(aet):
            raise ValueError(f"{aet!r} is not a valid AE title")
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range 1-65535")
        return cls(ae_title=aet, host=host, port=port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


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
Level = Literal["STAT", "URGENT", "ROUTINE"]


class Settings(BaseModel):
    """Every key of the node. README "Configuration" lists them with their meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # DICOM listener
    ae_title: str = "ICHNODE"
    bind: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[str] = []  # empty: any calling AE title is accepted
    check_called_aet: bool = True  # refuse associations addressed to another AE title than ae_title
    max_associations: int = Field(default=16, ge=1)
    # storage
    data_dir: Path = Path("var")
    retention_days: float = Field(default=7.0, ge=0)  # spooled instances and results kept after analysis; 0 = forever
    # series assembly and selection
    quiet_seconds: float = Field(default=10.0, gt=0, le=3600)
    min_slices: int = Field(default=16, ge=1)
    min_coverage_mm: float = Field(default=80.0, ge=0)
    # queue and workers
    broker_url: str = ""  # empty: embedded broker in data_dir; redis://host:port/db for Redis
    workers: int = Field(default=1, ge=0)  # worker processes `serve` starts
    task_timeout_seconds: float = Field(default=900.0, gt=0)  # analysing longer than this is re-queued
    # detector
    model_path: Path | None = None  # None: the shipped ensemble
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # delivery
    destinations: list[Destination | StowEndpoint] = []
    delivery_max_backoff_seconds: float = Field(default=300.0, gt=0)
    # credentials and trust for stow: destinations (never logged)
    stow_token: SecretStr = SecretStr("")  # sent as `Authorization: Bearer <token>`
    stow_password: SecretStr = SecretStr("")
    stow_username: str = Field(default="", validate_default=True)  # with stow_password: HTTP basic authentication
    stow_ca_bundle: Path | None = None  # PEM file of CAs for https; None: the system's CA store
    # HTTP API and web page
    http_bind: str = "127.0.0.1"
    http_port: Port = 8080
    api_token: str = ""  # when set, the API needs `Authorization: Bearer <token>`
    public_url: str = ""  # how users reach the web page, for links in webhooks (e.g. https://ichnode.hospital.org)
    # priority rule: level STAT / URGENT / ROUTINE
    stat_probability: float = Field(default=0.72, ge=0, le=1)  # the shipped model's CV operating point (MODEL_CARD.md)
    urgent_probability: float = Field(default=0.29, ge=0, le=1)
    stat_volume_ml: float = Field(default=30.0, ge=0)
    # RIS and webhooks
    hl7_endpoints: list[HostPort] = []
    hl7_sending_facility: str = "ICHNODE"
    webhooks: list[str] = []
    webhook_min_level: Level = "URGENT"
    webhook_include_patient: bool = False  # include patient name/id in webhook payloads
    # logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

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

    @field_validator("hl7_endpoints", mode="before")
    @classmethod
    def _parse_endpoints(cls, value):
        return [HostPort.parse(v) if isinstance(v, str) else v for v in value]

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be empty (embedded broker) or a redis:// URL")
        return value

    @field_validator("webhooks")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _check_thresholds(self) -> "Settings":
        if self.urgent_probability > self.stat_probability:
            raise ValueError(f"urgent_probability {self.urgent_probability} is above stat_probability "
                             f"{self.stat_probability}")
        return self

    # derived paths: one place says where things live under data_dir
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


def _list_fields() -> set[str]:
    return {name for name, f in Settings.model_fields.items() if "list[" in str(f.annotation)}


def _optional_fields() -> set[str]:
    """Keys whose empty environment value means None (no model path, no CA bundle)."""
    return {name for name, f in Settings.model_fields.items() if "None" in str(f.annotation)}


def _from_env(environ: dict[str, str]) -> dict[str, object]:
    values: dict[str, object] = {}
    lists, optionals = _list_fields(), _optional_fields()
    for name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if name in lists:
            values[name] = [item.strip() for item in raw.split(",") if item.strip()]
        elif name in optionals and raw == "":
            values[name] = None
        else:
            values[name] = raw
    return values


def _redact(text: str) -> str:
    """Masks the credentials of URLs (scheme://user:password@host) in a config error."""
    return re.sub(r"//[^/@\s]+@", "//***@", text)


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file, then the environment. Raises ConfigError naming the key."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    values: dict[str, object] = {}
    if path:
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    env_values = _from_env(environ)
    values.update(env_values)
    try:
        return Settings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "urgent_probability"
        origin = f"{ENV_PREFIX}{key.upper()}" if key in env_values else f"{key} (in {path or 'defaults'})"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"config key {key!r} (in {path}): unknown key") from None
        got = f" (got {_redact(repr(err.get('input')))})" if err["loc"] else ""
        raise ConfigError(f"config {origin}: {err['msg']}{got}") from None
