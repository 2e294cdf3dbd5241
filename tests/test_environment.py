"""One place holds the versions: pyproject.toml. The conda envs and the lock must agree with it,
and each rule's conda env must hold every package its script (and the library under it) imports."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest
import yaml
from conftest import ROOT

SCRIPTS = ROOT / "workflow" / "scripts"
#: packages scanpy imports only when a function needs them (Leiden, UMAP, the kNN graph, Scrublet)
LAZY = {"scanpy": {"leidenalg", "igraph", "umap-learn", "pynndescent", "scikit-image", "scikit-learn", "h5py"}}


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


def env_pins(path):
    spec = yaml.safe_load(path.read_text())
    assert "python=3.11" in spec["dependencies"], path.name
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = _pins(pip)
    assert len(pins) == len(pip), f"{path.name}: every package must be pinned with =="
    return pins


def rules():
    """{rule: (script, conda env file)} read from the rule files (every rule must name both)."""
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    constants = dict(re.findall(r'^(\w+_ENV) = "\.\./\.\./(envs/[\w.-]+\.yaml)"', common, re.MULTILINE))
    found = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"(?m)^(?=rule )", smk.read_text())[1:]:
            name = re.match(r"rule (\w+):", block).group(1)
            if name == "all":
                continue
            conda = re.search(r"^\s+conda:\s*\n\s+(\w+)", block, re.MULTILINE)
            script = re.search(r'^\s+script:\s*\n\s+"\.\./scripts/([\w.]+)"', block, re.MULTILINE)
            assert conda and conda.group(1) in constants, f"rule {name} names no conda environment"
            assert script, f"rule {name} has no script"
            found[name] = (SCRIPTS / script.group(1), ROOT / constants[conda.group(1)])
    return found


def _module_file(name):
    base = SCRIPTS.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def third_party_imports(path, seen=None):
    """Top-level modules outside the standard library that ``path`` imports, following the
    library's own modules (function-level imports included)."""
    seen = set() if seen is None else seen
    if path in seen:
        return set()
    seen.add(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "cellatlas":
                module = _module_file(name)
                if module is not None:
                    out |= third_party_imports(module, seen)
            elif top not in sys.stdlib_module_names and top != "__future__":
                out.add(top)
    return out


def test_conda_envs_agree_with_pyproject():
    project = project_pins()
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert len(envs) >= 2, "one environment per group of rules"
    for env in envs:
        for name, version in env_pins(env).items():
            assert project.get(name) == version, f"{env.name} pins {name}=={version}, pyproject {project.get(name)}"


def test_every_rule_names_an_env_that_holds_what_its_script_imports():
    dists = packages_distributions()
    found = rules()
    assert {"ingest", "embed", "classify_model", "train_vae", "atlas_map", "summary"} <= set(found)
    used = set()
    for rule, (script, env) in found.items():
        pins = env_pins(env)
        used.add(env.name)
        needed = set()
        for module in third_party_imports(script):
            names = {d.lower() for d in dists.get(module, [module])}
            # one distribution per module is enough (mlflow's modules are also in mlflow-skinny)
            assert names & set(pins), f"rule {rule}: {env.name} has none of {sorted(names)} (import {module})"
            needed |= names & set(pins)
        for pkg, extras in LAZY.items():
            if pkg in needed:
                assert extras <= set(pins), f"rule {rule}: {env.name} lacks {sorted(extras - set(pins))} for {pkg}"
    assert used == {p.name for p in (ROOT / "envs").glob("*.yaml")}, "an environment no rule uses"


def test_the_scanpy_stages_do_not_pull_torch():
    found = rules()
    for rule in ("ingest", "qc", "normalize", "embed", "cluster"):
        assert "torch" not in env_pins(found[rule][1]), rule
        assert "torch" not in third_party_imports(found[rule][0]), rule


def test_lock_agrees_with_pyproject():
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    for name, version in project_pins().items():
        assert lock.get(name) == version, f"requirements.lock has {name}=={lock.get(name)}, pyproject {version}"


def test_installed_versions_match_pins():
    from importlib.metadata import version

    for name, pinned in project_pins().items():
        # a local build tag is the same release (torch 2.13.0+cpu here, +cu128 on a GPU node)
        assert version(name).split("+")[0] == pinned, name


@pytest.mark.parametrize("attempt", [1, 2])
def test_slurm_profile_memory_and_time_grow_with_each_attempt(attempt):
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    blocks = {"default": profile["default-resources"], **profile["set-resources"]}
    for name, resources in blocks.items():
        for key in ("mem_mb", "runtime"):
            if key in resources:
                expr = str(resources[key])
                now, then = eval(expr, {"attempt": attempt}), eval(expr, {"attempt": attempt + 1})
                assert then > now > 0, f"profiles/slurm: {name}.{key} = {expr} does not grow with attempt"
    assert profile["set-resources"]["train_vae"]["slurm_partition"] != profile["default-resources"]["slurm_partition"]
    # the default profile must never send jobs anywhere
    assert "executor" not in yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
