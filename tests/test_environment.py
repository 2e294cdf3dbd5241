"""One place holds the versions: pyproject.toml. The conda env and the lock must agree with it."""

import re
import tomllib

import yaml

from conftest import ROOT


def _pins(lines):
    pins = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)\s*", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def project_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _pins(deps)
    assert len(pins) == len(deps), "every direct dependency must be pinned with =="
    return pins


def test_conda_env_agrees_with_pyproject():
    for env in (ROOT / "envs").glob("*.yaml"):
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
        assert "python=3.11" in spec["dependencies"], env.name
        assert _pins(pip) == project_pins(), env.name


def test_lock_agrees_with_pyproject():
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    for name, version in project_pins().items():
        assert lock.get(name) == version, f"requirements.lock has {name}=={lock.get(name)}, pyproject {version}"


def test_installed_versions_match_pins():
    from importlib.metadata import version

    for name, pinned in project_pins().items():
        # a local build tag is the same release (torch 2.13.0+cpu here, +cu128 on a GPU node)
        assert version(name).split("+")[0] == pinned, name
