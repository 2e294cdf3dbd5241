import copy

import pytest
import yaml

from cellatlas.config import validate
from cellatlas.errors import ConfigError

from conftest import ROOT

SCHEMA = ROOT / "config" / "schema" / "config.schema.yaml"


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_default_config_is_valid(config):
    validate(config, SCHEMA)


def test_defaults_are_filled_in():
    cfg = validate({"datasets": {"d1": {"source": {"kind": "scanpy", "name": "pbmc68k_reduced"}}}}, SCHEMA)
    assert cfg["qc"]["mode"] == "mad" and cfg["qc"]["fixed"]["min_genes"] == 200
    assert cfg["cluster"]["resolutions"] == [0.5, 1.0]
    assert cfg["datasets"]["d1"]["values"] == "counts" and cfg["datasets"]["d1"]["label_key"] is None
    assert cfg["tracking"]["experiment"] == "cellatlas"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["qc"].update(mode="fancy"), "config key 'qc.mode': 'fancy' is not one of ['mad', 'fixed']"),
        (lambda c: c["embed"].update(n_pcs=1), "config key 'embed.n_pcs': 1 is less than the minimum of 2"),
        (lambda c: c["cluster"].update(resolutions=[]), "config key 'cluster.resolutions'"),
        (lambda c: c["datasets"].update({"bad id": c["datasets"]["sim"]}), "does not match"),
        (lambda c: c["datasets"]["sim"]["source"].update(kind="zarr"), "config key 'datasets.sim.source.kind'"),
        (lambda c: c["datasets"]["sim"]["source"].pop("n_cells"), "'n_cells' is required"),
        (lambda c: c["datasets"].update(x={"source": {"kind": "h5ad"}}), "config key 'datasets.x.source': 'path' is required"),
        (lambda c: c.update(typo=1), "unknown key(s) ('typo' was unexpected)"),
        (lambda c: c["cluster"].update(marker_resolution=0.7), "'cluster.marker_resolution': 0.7 is not one of"),
    ],
)
def test_bad_config_names_the_key(config, edit, expected):
    cfg = copy.deepcopy(config)
    edit(cfg)
    with pytest.raises(ConfigError) as e:
        validate(cfg, SCHEMA)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)
