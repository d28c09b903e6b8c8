"""`.ci/install.py`: pip's configuration handed to uv, and the fallback to pip for what it cannot translate."""
import importlib.util
import subprocess
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("ci_install", Path(__file__).parents[1] / ".ci" / "install.py")
install = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(install)

_CONFIG = """:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.find-links='/opt/wheels'
download.dest='/tmp/elsewhere'
"""


@pytest.fixture
def fake_pip(monkeypatch):
    def run(cmd, **kwargs):
        assert cmd[1:] == ["-m", "pip", "config", "list"]
        return subprocess.CompletedProcess(cmd, 0, stdout=fake_pip.config, stderr="")
    fake_pip.config = _CONFIG
    monkeypatch.setattr(install.subprocess, "run", run)
    return fake_pip


def test_pip_settings_follow_pips_precedence_and_split_values(fake_pip):
    settings = install.pip_settings("py")
    assert settings["find-links"] == ["/opt/wheels"]
    assert settings["extra-index-url"] == ["file:///opt/a/simple", "file:///opt/b/simple"]
    assert "dest" not in settings  # a `download` setting does not apply to install
    fake_pip.config = ("global.index-url='https://global.example/simple'\n"
                       ":env:.index-url='https://env.example/simple'\n"
                       "install.index-url='https://install.example/simple'\n"
                       "global.find-links='/a /b'\ninstall.find-links='/c'\n")
    settings = install.pip_settings("py")
    assert settings["index-url"] == ["https://env.example/simple"]  # PIP_INDEX_URL wins, as in pip
    assert settings["find-links"] == ["/c"]  # [install] over [global]


def test_uv_command_carries_every_index_and_constraint(fake_pip, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("UV_HTTP_TIMEOUT", raising=False)
    cmd, env = install.uv_command("py", ".[dev]", install.pip_settings("py"))
    pairs = list(zip(cmd, cmd[1:]))
    assert ("--index-strategy", "unsafe-best-match") in pairs  # pip's rule: best version across indexes
    assert ("--extra-index-url", "file:///opt/a/simple") in pairs and ("--extra-index-url", "file:///opt/b/simple") in pairs
    assert ("--find-links", "/opt/wheels") in pairs and ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    assert ("--python", "py") in pairs and "--compile-bytecode" in cmd and cmd[-2:] == ["-e", ".[dev]"]
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca.crt" and env["UV_HTTP_TIMEOUT"] == "180"


def test_an_untranslated_pip_setting_means_pip(fake_pip):
    fake_pip.config = _CONFIG + "global.require-hashes='true'\n"
    with pytest.raises(ValueError, match="require-hashes"):
        install.uv_command("py", ".", install.pip_settings("py"))


def test_install_falls_back_to_pip_when_uv_fails(monkeypatch):
    calls = []

    def run(cmd, env=None):
        calls.append(cmd)
        return cmd[:3] != ["py", "-m", "uv"]  # uv's install fails, every pip call works

    monkeypatch.setattr(install, "pip_settings", lambda python: {})
    monkeypatch.setattr(install, "_run", run)
    monkeypatch.delenv("LIGHTNING_EFF_INSTALLER", raising=False)
    install.install(".[dev]", python="py")
    assert [c[:3] for c in calls] == [["py", "-m", "pip"], ["py", "-m", "uv"], ["py", "-m", "pip"], ["py", "-m", "pip"]]
    assert calls[-1][-2:] == ["-e", ".[dev]"]
    calls.clear()
    monkeypatch.setenv("LIGHTNING_EFF_INSTALLER", "pip")
    install.install(".[dev]", python="py")
    assert all(c[:3] == ["py", "-m", "pip"] for c in calls) and len(calls) == 2


def test_an_unknown_installer_is_refused(monkeypatch):
    monkeypatch.setenv("LIGHTNING_EFF_INSTALLER", "conda")
    with pytest.raises(SystemExit, match="LIGHTNING_EFF_INSTALLER='conda' is not one of 'uv', 'pip'"):
        install.install(".", python="py")
