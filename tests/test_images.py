"""Image datasets: the simulator, the readers and their one-line errors, the CNN and its augmentation."""

import numpy as np
import pandas as pd
import pytest
from cellatlas import keys
from cellatlas.errors import InputDataError


@pytest.fixture(scope="module")
def small():
    from cellatlas.images.simulate import simulate_images

    return simulate_images(n_plates=2, wells_per_class=1, fields_per_well=1, cells_per_field=6, size=16, seed=3)


def test_the_simulator_is_seeded_and_gives_each_well_one_class(small):
    from cellatlas.images import image_shape
    from cellatlas.images.simulate import simulate_images

    assert image_shape(small) == (2, 16, 16) and small.n_obs == 2 * 3 * 6
    assert small.X.dtype == np.float32 and 0 <= small.X.min() and small.X.max() <= 1
    again = simulate_images(n_plates=2, wells_per_class=1, fields_per_well=1, cells_per_field=6, size=16, seed=3)
    np.testing.assert_array_equal(small.X, again.X)
    assert not np.array_equal(small.X, simulate_images(n_plates=2, wells_per_class=1, fields_per_well=1,
                                                       cells_per_field=6, size=16, seed=4).X)
    per_well = small.obs.groupby("well", observed=True)[keys.LABEL].nunique()
    assert (per_well == 1).all()
    per_plate = small.obs.groupby("plate", observed=True)[keys.LABEL].nunique()
    assert (per_plate == 3).all()


def _write_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_a_folder_of_pngs_is_read_as_one_row_per_image(tmp_path):
    from cellatlas.images import image_shape
    from cellatlas.images.read import read_folder

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(3):
            _write_png(tmp_path / c / f"{i}.png", rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
    rgba = rng.integers(0, 256, (8, 10, 4), dtype=np.uint8)
    _write_png(tmp_path / "b" / "alpha.png", rgba)
    adata = read_folder("imgs", tmp_path)
    assert image_shape(adata) == (3, 8, 10) and adata.n_obs == 7
    assert adata.obs[keys.LABEL].value_counts().to_dict() == {"b": 4, "a": 3}
    # RGBA keeps its colour, drops its alpha; 8-bit values scaled to [0, 1]
    row = adata.X[list(adata.obs_names).index("b/alpha.png")].reshape(3, 8, 10)
    np.testing.assert_allclose(row, np.moveaxis(rgba[..., :3], -1, 0) / 255.0, atol=1e-6)


def test_a_table_of_16_bit_tiffs_keeps_every_channel_and_its_groups(tmp_path):
    import tifffile
    from cellatlas.images import image_shape
    from cellatlas.images.read import read_table

    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        img = rng.integers(0, 65536, (5, 12, 12), dtype=np.uint16)  # five channels first
        tifffile.imwrite(tmp_path / f"cell{i}.tif", img)
        rows.append({"file": f"cell{i}.tif", "class": "x" if i < 2 else "y", "plate": f"p{i % 2}"})
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    adata = read_table("screen", tmp_path / "cells.csv", path_column="file", label_column="class", group_keys=["plate"])
    assert image_shape(adata) == (5, 12, 12) and adata.obs["plate"].tolist() == ["p0", "p1", "p0", "p1"]
    np.testing.assert_allclose(adata.X[0].reshape(5, 12, 12), tifffile.imread(tmp_path / "cell0.tif") / 65535.0,
                               atol=1e-6)


def test_stacks_keep_every_channel_first_or_last_and_object_arrays_are_refused(tmp_path):
    import tifffile
    from cellatlas.images import image_shape
    from cellatlas.images.read import load_image, read_npz

    many = np.random.default_rng(3).integers(0, 255, (10, 16, 16), dtype=np.uint8)  # 10 channels first
    tifffile.imwrite(tmp_path / "first.tif", many)
    tifffile.imwrite(tmp_path / "last.tif", np.moveaxis(many, 0, -1))
    np.testing.assert_array_equal(load_image(tmp_path / "first.tif"), load_image(tmp_path / "last.tif"))
    assert load_image(tmp_path / "first.tif").shape == (10, 16, 16)
    big_endian = np.random.default_rng(4).integers(0, 65535, (4, 8, 8, 3)).astype(">u2")
    np.savez(tmp_path / "be.npz", images=big_endian, labels=np.array(["a", "b"] * 2))
    adata = read_npz("arr", tmp_path / "be.npz")
    assert image_shape(adata) == (3, 8, 8) and adata.X.max() <= 1.0
    np.savez(tmp_path / "obj.npz", images=big_endian, labels=np.array(["a", "b", "a", "b"], dtype=object))
    with pytest.raises(InputDataError, match=r"^dataset 'arr', file '.*obj\.npz': .*allow_pickle.*astype\(str\)"):
        read_npz("arr", tmp_path / "obj.npz")


def test_an_npz_of_grey_images_is_one_channel(tmp_path):
    from cellatlas.images import image_shape
    from cellatlas.images.read import read_npz

    images = np.random.default_rng(2).random((6, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "a.npz", images=images, labels=np.array(["u", "v"] * 3), well=np.arange(6) // 2)
    adata = read_npz("arr", tmp_path / "a.npz", group_keys=["well"])
    assert image_shape(adata) == (1, 9, 9) and adata.obs["well"].tolist() == ["0", "0", "1", "1", "2", "2"]
    np.testing.assert_array_equal(adata.X, images.reshape(6, -1))


def _table(tmp_path, rows, **kw):
    from cellatlas.images.read import read_table

    pd.DataFrame(rows).to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    return lambda: read_table("screen", tmp_path / "t.tsv", **kw)


@pytest.mark.parametrize("case, message", [
    ("unreadable", r"^dataset 'screen', file '.*bad\.png': cannot read image"),
    ("sizes", r"^dataset 'screen', file '.*big\.png': image is 9x9 pixels, 1 channel\(s\), '.*0\.png' is 8x8"),
    ("one_image", r"^dataset 'screen', file '.*t\.tsv': class 'lonely' has 1 image; every class needs at least 2"),
    ("no_label", r"^dataset 'screen', file '.*t\.tsv': 1 image\(s\) have no label, the first '1\.png'"),
    ("no_group", r"^dataset 'screen', file '.*t\.tsv': image table has no column 'plate' \(group_keys; columns: "),
    ("missing", r"^dataset 'screen', file '.*gone\.png': cannot read image"),
])
def test_bad_images_are_one_line_errors_naming_the_file(tmp_path, case, message):
    grey = np.zeros((8, 8), dtype=np.uint8)
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", grey)
    rows = [{"path": f"{i}.png", "label": "a" if i < 2 else "b", "plate": "p"} for i in range(3)]
    rows.append({"path": "3.png", "label": "b", "plate": "p"})
    _write_png(tmp_path / "3.png", grey)
    kw = {"group_keys": ["plate"]}
    if case == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"not a png")
        rows.append({"path": "bad.png", "label": "a", "plate": "p"})
    elif case == "sizes":
        _write_png(tmp_path / "big.png", np.zeros((9, 9), dtype=np.uint8))
        rows.append({"path": "big.png", "label": "a", "plate": "p"})
    elif case == "one_image":
        rows.append({"path": "0.png", "label": "lonely", "plate": "p"})
    elif case == "no_label":
        rows[1]["label"] = None
    elif case == "no_group":
        rows = [{k: v for k, v in r.items() if k != "plate"} for r in rows]
    elif case == "missing":
        rows.append({"path": "gone.png", "label": "a", "plate": "p"})
    with pytest.raises(InputDataError, match=message) as e:
        _table(tmp_path, rows, **kw)()
    assert "\n" not in str(e.value)


def test_augmentation_keeps_shapes_and_values_and_does_nothing_unasked():
    import torch
    from cellatlas.deep.vision import augment

    torch.manual_seed(0)
    x = torch.rand(16, 2, 12, 12)
    assert torch.equal(augment(x, {}), x)
    turned = augment(x, {"flips": True, "rotate90": True})
    assert turned.shape == x.shape
    # flips and quarter turns move pixels, never change them
    assert torch.allclose(turned.sum(dim=(-2, -1)), x.sum(dim=(-2, -1)), atol=1e-4)
    assert not torch.equal(turned, x)
    cropped = augment(x, {"crop_scale": 0.6, "brightness": 0.2, "contrast": 0.2})
    assert cropped.shape == x.shape and torch.isfinite(cropped).all()


def test_resnet18_has_torchvisions_layers_and_takes_any_channel_count():
    import torch
    from cellatlas.deep.vision import ResNet18

    # torchvision's resnet18(num_classes=1000) has 11,689,512 parameters, under these names
    net = ResNet18(3, 1000)
    assert sum(p.numel() for p in net.parameters()) == 11_689_512
    names = set(net.state_dict())
    assert {"conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight", "fc.bias"} <= names
    assert ResNet18(5, 4)(torch.rand(2, 5, 32, 32)).shape == (2, 4)


def _fit(small, **kw):
    from cellatlas.deep.estimator import CNNClassifier
    from cellatlas.images import image_shape

    y = small.obs[keys.LABEL].astype(str).to_numpy()
    model = CNNClassifier(image_shape=image_shape(small), max_epochs=3, batch_size=16, val_fraction=0.0,
                          trainer={"accelerator": "cpu", "threads": 1},
                          augmentation={"flips": True, "rotate90": True, "brightness": 0.1}, **kw)
    return model.fit(small.X, y)


def test_same_seed_same_cnn_on_the_cpu(small):
    a, b = _fit(small), _fit(small)
    np.testing.assert_array_equal(a.predict_proba(small.X), b.predict_proba(small.X))
    c = _fit(small, random_state=1)
    assert not np.array_equal(a.predict_proba(small.X), c.predict_proba(small.X))
    assert a.predict_proba(small.X).shape == (small.n_obs, 3) and set(a.predict(small.X)) <= set(a.classes_)


def test_init_weights_load_what_fits_and_freezing_trains_only_the_last_block(small, tmp_path):
    import torch
    from cellatlas.errors import CellAtlasError

    source = _fit(small)
    path = tmp_path / "weights.pt"
    torch.save(source.net_.state_dict(), path)
    tuned = _fit(small, init_weights=str(path), freeze="all_but_last")
    before, after = source.net_.state_dict(), tuned.net_.state_dict()
    # the first blocks are the source's, untouched, batch-norm statistics included; the last
    # block and the head were trained on
    for key in ("blocks.0.0.weight", "blocks.1.0.weight", "blocks.0.1.running_mean", "blocks.1.1.running_var"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["blocks.2.0.weight"], after["blocks.2.0.weight"])
    assert not torch.equal(before["blocks.2.1.running_mean"], after["blocks.2.1.running_mean"])
    wrong = tmp_path / "resnet.pt"
    from cellatlas.deep.vision import ResNet18

    torch.save(ResNet18(7, 2).state_dict(), wrong)
    with pytest.raises(CellAtlasError, match=r"init_weights '.*resnet\.pt': none of its \d+ tensors fits"):
        _fit(small, init_weights=str(wrong))
    with pytest.raises(CellAtlasError, match=r"freeze 'all_but_last' without init_weights"):
        _fit(small, freeze="all_but_last")


def test_image_models_and_datasets_are_checked_in_the_config():
    from cellatlas.config import validate
    from cellatlas.errors import ConfigError
    from test_config import SCHEMA

    def cfg(**images):
        return {"datasets": {}, "images": {"datasets": {"cells": {"source": {"kind": "simulate"}}}, **images}}

    out = validate(cfg(), SCHEMA)
    from cellatlas.config import classify_tasks

    spec = classify_tasks(out)[("cells", "label")]
    assert spec["split"]["group_key"] == "plate" and list(spec["models"]) == ["cnn"]
    assert spec["models"]["cnn"]["params"]["augmentation"]["flips"] is True
    with pytest.raises(ConfigError, match=r"^config key 'images.models.m.kind': knn does not read images"):
        validate(cfg(models={"m": {"kind": "knn"}}), SCHEMA)
    with pytest.raises(ConfigError, match=r"^config key 'classify.classifiers.c.kind': cnn reads images"):
        validate({**cfg(), "classify": {"classifiers": {"c": {"kind": "cnn"}}}}, SCHEMA)
    with pytest.raises(ConfigError, match=r"^config key 'images.models.cnn.params': .*'depth'"):
        validate(cfg(models={"cnn": {"kind": "cnn", "params": {"depth": 3}}}), SCHEMA)
    with pytest.raises(ConfigError, match=r"^config key 'images.models.cnn.params': unknown augmentation \['flip'\]"):
        validate(cfg(models={"cnn": {"kind": "cnn", "params": {"augmentation": {"flip": True}}}}), SCHEMA)
    # a model's own augmentation is laid over images.augmentation key by key
    own = validate(cfg(models={"cnn": {"kind": "cnn", "params": {"augmentation": {"crop_scale": 0.8}}}}), SCHEMA)
    augmentation = classify_tasks(own)[("cells", "label")]["models"]["cnn"]["params"]["augmentation"]
    assert augmentation["crop_scale"] == 0.8 and augmentation["flips"] is True
    # a network trained on the dataset's own images has seen its test folds
    leak = cfg(models={"cnn": {"kind": "cnn"}, "tuned": {"kind": "cnn", "params": {
        "init_weights": "results/cells/classify/label/models/cnn/model.ckpt"}}})
    with pytest.raises(ConfigError, match=r"init_weights': '.*' was trained on dataset 'cells' itself"):
        validate(leak, SCHEMA)
    leak["images"]["datasets"]["cells"]["models"] = ["cnn"]
    validate(leak, SCHEMA)
    bad_split = cfg()
    bad_split["images"]["datasets"]["cells"]["split"] = {"group_key": "donor"}
    with pytest.raises(ConfigError, match=r"'donor' is not one of its group_keys \['plate', 'well', 'field'\]"):
        validate(bad_split, SCHEMA)
