import re

import pytest

from ichnode.cli import main, worker_cpu_threads
from ichnode.common.config import ConfigError, environment_variables, load_settings, sections
from tests.helpers import ROOT


def test_environment_overrides_file_and_parses_lists(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[listener]\nport = 4000\nae_title = "FROMFILE"\n')
    settings = load_settings(config, environ={
        "ICHNODE_PORT": "104",
        "ICHNODE_DESTINATIONS": "PACS@10.0.0.5:104, VIEWER@viewer.local:11112",
        "ICHNODE_HL7_ENDPOINTS": "ris:2575",
        "ICHNODE_BROKER_URL": "redis://127.0.0.1:6379/0",
        "ICHNODE_HTTP_PORT": "9090",
    })
    assert settings.listener.port == 104 and settings.listener.ae_title == "FROMFILE"
    assert [str(d) for d in settings.delivery.destinations] == ["PACS@10.0.0.5:104", "VIEWER@viewer.local:11112"]
    assert [str(e) for e in settings.hl7.endpoints] == ["ris:2575"]
    assert settings.queue.broker_url == "redis://127.0.0.1:6379/0" and settings.http.port == 9090


def test_every_key_keeps_its_environment_variable_from_before_the_sections():
    variables = environment_variables()
    assert variables["ICHNODE_PORT"] == ("listener", "port")
    assert variables["ICHNODE_HTTP_PORT"] == ("http", "port")
    assert variables["ICHNODE_DELIVERY_MAX_BACKOFF_SECONDS"] == ("delivery", "max_backoff_seconds")
    assert variables["ICHNODE_WEBHOOKS"] == ("webhook", "urls")
    assert variables["ICHNODE_LOG_LEVEL"] == ("log_level",)
    keys = {(name, key) for name, section in sections().items() for key in section.model_fields}
    assert set(variables.values()) == keys | {("log_level",)}  # one variable per key


@pytest.mark.parametrize("env, key", [
    ({"ICHNODE_PORT": "seventy"}, "ICHNODE_PORT"),
    ({"ICHNODE_PORT": "70000"}, "ICHNODE_PORT"),
    ({"ICHNODE_DESTINATIONS": "PACS@host"}, "ICHNODE_DESTINATIONS"),
    ({"ICHNODE_AE_TITLE": "A" * 17}, "ICHNODE_AE_TITLE"),
    ({"ICHNODE_BROKER_URL": "amqp://guest@localhost"}, "ICHNODE_BROKER_URL"),
    ({"ICHNODE_QUIET_SECONDS": "-1"}, "ICHNODE_QUIET_SECONDS"),
    ({"ICHNODE_WEBHOOKS": "ftp://x"}, "ICHNODE_WEBHOOKS"),
    ({"ICHNODE_URGENT_PROBABILITY": "0.9"}, "ICHNODE_URGENT_PROBABILITY"),
])
def test_invalid_value_names_the_key(env, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_settings(environ=env)


def test_stow_destinations_and_credentials_live_in_the_delivery_section():
    settings = load_settings(environ={
        "ICHNODE_DESTINATIONS": "PACS@10.0.0.5:104,stow:https://vna.example.org/dicom-web/",
        "ICHNODE_STOW_TOKEN": "secret-token", "ICHNODE_STOW_CA_BUNDLE": "",
    })
    pacs, archive = settings.delivery.destinations
    assert str(pacs) == "PACS@10.0.0.5:104" and str(archive) == "stow:https://vna.example.org/dicom-web"
    assert settings.delivery.stow_token.get_secret_value() == "secret-token" and settings.delivery.stow_ca_bundle is None
    assert "secret-token" not in repr(settings)


@pytest.mark.parametrize("env, message", [
    ({"ICHNODE_STOW_TOKEN": "t", "ICHNODE_STOW_USERNAME": "u"}, "ICHNODE_STOW_USERNAME: .*either stow_token or"),
    ({"ICHNODE_STOW_PASSWORD": "p"}, "stow_password is set but stow_username is empty"),
    ({"ICHNODE_STOW_CA_BUNDLE": "/nowhere/ca.pem"}, "ICHNODE_STOW_CA_BUNDLE: .*is not a file"),
])
def test_stow_credentials_and_trust_are_checked(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


def test_credentials_in_a_stow_url_are_refused_without_being_shown():
    with pytest.raises(ConfigError, match="credentials do not belong in the URL") as refused:
        load_settings(environ={"ICHNODE_DESTINATIONS": "stow:https://user:hunter2@vna.example.org/dicom-web"})
    assert "hunter2" not in str(refused.value)


def test_invalid_value_in_the_file_names_section_and_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[http]\nport = 0\n")
    with pytest.raises(ConfigError, match=r"http\.port .*greater than or equal to 1"):
        load_settings(config, environ={})


@pytest.mark.parametrize(("text", "message"), [
    ("prot = 104\n", "'prot'.*unknown key"),
    ("[listener]\nprot = 104\n", "'listener.prot'.*unknown key"),
    ("port = 104\n", r"'port'.*moved to \[listener\] port"),  # a configuration from before the sections
    ("webhook_min_level = 'STAT'\n", r"moved to \[webhook\] min_level"),
])
def test_unknown_or_moved_key_in_file_is_named(tmp_path, text, message):
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ={})


def test_cli_stops_with_one_line_naming_the_key(monkeypatch, capsys):
    monkeypatch.setenv("ICHNODE_PORT", "not-a-port")
    assert main(["node"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ICHNODE_PORT" in err


def test_shipped_config_loads_and_documents_every_key():
    text = (ROOT / "config" / "ichnode.toml").read_text()
    load_settings(ROOT / "config" / "ichnode.toml", environ={})
    tables = dict(re.findall(r"^\[(\w+)\][^\n]*\n(.*?)(?=^\[|\Z)", text, re.M | re.S))
    for name, section in sections().items():
        assert name in tables, f"config/ichnode.toml has no [{name}]"
        for key in section.model_fields:
            assert re.search(rf"^#? ?{key} =", tables[name], re.M), f"config/ichnode.toml does not document {name}.{key}"
    assert re.search(r"^#? ?log_level =", text, re.M)


def test_readme_lists_every_key_with_its_environment_variable():
    readme = (ROOT / "README.md").read_text()
    for variable, key in environment_variables().items():
        assert re.search(rf"^\| `{re.escape('.'.join(key))}` \| `{variable}` \|", readme, re.M), \
            f"README does not list {'.'.join(key)} with {variable}"



def test_unsafe_settings_are_each_named_and_a_hardened_setup_has_none(tmp_path):
    defaults = load_settings(environ={}).unsafe()
    assert any("allowed_calling_aets is empty" in line for line in defaults)
    assert any("plain DICOM without TLS" in line for line in defaults)
    assert any("api_token is empty" in line for line in defaults)
    for name in ("node.crt", "node.key", "ca.crt"):
        (tmp_path / name).write_text("PEM")
    hardened = load_settings(environ={
        "ICHNODE_ALLOWED_CALLING_AETS": "CT1", "ICHNODE_TLS_CERT": str(tmp_path / "node.crt"),
        "ICHNODE_TLS_KEY": str(tmp_path / "node.key"), "ICHNODE_TLS_CA": str(tmp_path / "ca.crt"),
        "ICHNODE_PLAIN_PORT_ENABLED": "false", "ICHNODE_API_TOKEN": "t", "ICHNODE_DESTINATIONS": "tls:PACS@10.0.0.5:2762"})
    assert hardened.unsafe() == []
    exposed = load_settings(environ={"ICHNODE_HTTP_BIND": "0.0.0.0", "ICHNODE_DESTINATIONS": "PACS@10.0.0.5:104"})
    assert any("http.bind is 0.0.0.0" in line for line in exposed.unsafe())
    assert any("PACS@10.0.0.5:104 is not encrypted" in line for line in exposed.unsafe())


def test_tls_keys_are_checked_together(tmp_path):
    (tmp_path / "node.crt").write_text("PEM")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_settings(environ={"ICHNODE_TLS_CERT": str(tmp_path / "node.crt")})
    with pytest.raises(ConfigError, match="plain_port_enabled = false needs tls_cert"):
        load_settings(environ={"ICHNODE_PLAIN_PORT_ENABLED": "false"})
    with pytest.raises(ConfigError, match="ICHNODE_TLS_KEY.*not a file"):
        load_settings(environ={"ICHNODE_TLS_CERT": str(tmp_path / "node.crt"), "ICHNODE_TLS_KEY": "/nonexistent"})


def test_the_workers_serve_starts_share_the_cores_unless_their_threads_are_configured():
    assert worker_cpu_threads(load_settings(environ={}), workers=2, cores=2) == 1
    assert worker_cpu_threads(load_settings(environ={}), workers=1, cores=8) == 8
    assert worker_cpu_threads(load_settings(environ={}), workers=3, cores=2) == 1  # never none
    assert worker_cpu_threads(load_settings(environ={"ICHNODE_CPU_THREADS": "4"}), workers=2, cores=2) == 4
