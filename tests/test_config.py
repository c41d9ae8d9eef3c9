import re
from pathlib import Path

import pytest

from node.config import ConfigError, Settings, load_settings
from node.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_environment_overrides_file_and_parses_lists(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('port = 4000\nae_title = "FROMFILE"\n')
    settings = load_settings(config, environ={
        "ICHNODE_PORT": "104",
        "ICHNODE_DESTINATIONS": "PACS@10.0.0.5:104, VIEWER@viewer.local:11112",
        "ICHNODE_HL7_ENDPOINTS": "ris:2575",
        "ICHNODE_BROKER_URL": "redis://127.0.0.1:6379/0",
    })
    assert settings.port == 104 and settings.ae_title == "FROMFILE"
    assert [str(d) for d in settings.destinations] == ["PACS@10.0.0.5:104", "VIEWER@viewer.local:11112"]
    assert [str(e) for e in settings.hl7_endpoints] == ["ris:2575"]


@pytest.mark.parametrize("env, key", [
    ({"ICHNODE_PORT": "seventy"}, "ICHNODE_PORT"),
    ({"ICHNODE_PORT": "70000"}, "ICHNODE_PORT"),
    ({"ICHNODE_DESTINATIONS": "PACS@host"}, "ICHNODE_DESTINATIONS"),
    ({"ICHNODE_AE_TITLE": "A" * 17}, "ICHNODE_AE_TITLE"),
    ({"ICHNODE_BROKER_URL": "amqp://guest@localhost"}, "ICHNODE_BROKER_URL"),
    ({"ICHNODE_QUIET_SECONDS": "-1"}, "ICHNODE_QUIET_SECONDS"),
    ({"ICHNODE_WEBHOOKS": "ftp://x"}, "ICHNODE_WEBHOOKS"),
])
def test_invalid_value_names_the_key(env, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_settings(environ=env)


def test_unknown_key_in_file_is_named(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("prot = 104\n")
    with pytest.raises(ConfigError, match="'prot'.*unknown key"):
        load_settings(config, environ={})


def test_cli_stops_with_one_line_naming_the_key(monkeypatch, capsys):
    monkeypatch.setenv("ICHNODE_PORT", "not-a-port")
    assert main(["node"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ICHNODE_PORT" in err


def test_shipped_config_loads_and_documents_every_key():
    text = (ROOT / "config" / "ichnode.toml").read_text()
    load_settings(ROOT / "config" / "ichnode.toml", environ={})
    for key in Settings.model_fields:
        assert re.search(rf"^#? ?{key} =", text, re.M), f"config/ichnode.toml does not document {key}"


def test_readme_lists_every_key():
    readme = (ROOT / "README.md").read_text()
    for key in Settings.model_fields:
        assert f"ICHNODE_{key.upper()}" in readme, f"README does not list ICHNODE_{key.upper()}"
