"""Install the project into a virtual environment: uv where it can honour pip's configuration, else pip.

``make setup`` runs this with the venv's interpreter: ``.venv/bin/python .ci/install.py '.[dev,export]'``.
uv installs the same packages as pip (``--index-strategy unsafe-best-match`` is pip's rule: the best
version across every index) in about a third of the time (measured on 2 cores, cold caches: 40 s vs 95 s),
because it downloads and unpacks in parallel. uv does not read pip's configuration, so the indexes,
find-links, constraints, certificate and proxy that ``pip config list`` shows (files and ``PIP_*``
variables) are handed to it as options; a pip setting this script does not know how to translate, a
failed uv download or a failed uv install falls back to the plain pip install, which is always correct.
``LIGHTNING_EFF_INSTALLER=pip`` forces pip.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

# pip options with a uv equivalent: option -> uv flag, one per value (pip separates values by whitespace).
_REPEATED = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
             "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
# pip options that do not change what is installed (or are set for uv another way).
_IGNORED = {"disable-pip-version-check", "no-cache-dir", "progress-bar", "no-color", "quiet", "verbose",
            "retries", "root-user-action", "no-warn-script-location", "cache-dir", "prefer-binary",
            "no-input", "break-system-packages", "cert", "proxy", "timeout", "default-timeout", "no-index"}
# pip's precedence for one option: a PIP_* variable over the [install] section over [global].
_SECTIONS = {"global": 0, "install": 1, ":env:": 2}


def pip_settings(python: str) -> dict[str, list[str]]:
    """``pip config list`` of ``python``'s pip as option -> values, as pip applies them to ``pip install``.

    For each option the highest-precedence section that sets it wins (``PIP_*`` variables, then ``[install]``,
    then ``[global]``); other sections (``[download]``, ...) do not apply. Values are split on whitespace.
    """
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    found: dict[str, tuple[int, list[str]]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        section, dot, option = key.rpartition(".")
        if not sep or not dot or section not in _SECTIONS:
            continue
        words = [w for v in shlex.split(value) for w in v.split()]  # pip prints the value quoted
        rank = _SECTIONS[section]
        if option not in found or rank > found[option][0]:
            found[option] = (rank, list(dict.fromkeys(words)))
    return {option: words for option, (_, words) in found.items()}


def uv_command(python: str, requirement: str, settings: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """The ``uv pip install`` command and environment equivalent to pip's install of ``requirement``.

    Raises:
        ValueError: a pip setting that has no translation here (the caller then uses pip).
    """
    unknown = sorted(set(settings) - set(_REPEATED) - _IGNORED)
    if unknown:
        raise ValueError(f"pip settings {unknown} have no uv translation here")
    cmd = [python, "-m", "uv", "pip", "install", "-q", "--python", python, "--compile-bytecode",
           "--index-strategy", "unsafe-best-match"]
    for option, flag in _REPEATED.items():
        for value in settings.get(option, []):
            cmd += [flag, value]
    if any(v.lower() in ("1", "true", "yes", "on") for v in settings.get("no-index", [])):
        cmd.append("--no-index")
    env = dict(os.environ)
    if settings.get("cert") and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = settings["cert"][0]
    if settings.get("proxy"):
        for name in ("HTTPS_PROXY", "HTTP_PROXY"):
            env.setdefault(name, settings["proxy"][0])
    timeout = settings.get("timeout") or settings.get("default-timeout")
    if timeout:
        env.setdefault("UV_HTTP_TIMEOUT", timeout[0])
    return cmd + ["-e", requirement], env


def _run(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(cmd, env=env).returncode == 0


def install(requirement: str, python: str = sys.executable) -> None:
    """Install ``requirement`` (editable) into ``python``'s environment; uv first, pip as the fallback."""
    installer = os.environ.get("LIGHTNING_EFF_INSTALLER", "uv")
    if installer not in ("uv", "pip"):
        sys.exit(f"install: LIGHTNING_EFF_INSTALLER={installer!r} is not one of 'uv', 'pip'")
    if installer == "uv":
        try:
            cmd, env = uv_command(python, requirement, pip_settings(python))
        except (ValueError, subprocess.CalledProcessError) as err:
            print(f"install: pip's install instead of uv's ({err})", flush=True)
        else:
            if _run([python, "-m", "pip", "install", "-q", "uv>=0.5"]) and _run(cmd, env):
                return
            print("install: uv could not be installed or did not install the project; installing with pip", flush=True)
    if not (_run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
            and _run([python, "-m", "pip", "install", "-q", "-e", requirement])):
        sys.exit("install: pip install failed")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python .ci/install.py '.[extras]'")
    install(sys.argv[1])
