"""Images of cells on this machine: training and inference speed of the image models, the cost of
augmentation beside them, and what the split and transfer learning do to the scores.

    python benchmarks/image_benchmark.py              # CPU; on a GPU node it uses the GPU
    python benchmarks/image_benchmark.py --quick      # speed only (the last scores are kept)

Speed: the simulated screen of the demo (576 crops of 2 x 32 x 32), each architecture trained for a
fixed number of epochs without validation (images per second over the epochs; the median of three
fits), with and without augmentation; inference over all images; augmentation alone on the same
batches (median of three). Scores (small CNN,
4 folds, the classify stage's own scoring): folds grouped by plate against a random split of the
same images, and on a small screen (24 images a class) training from scratch against starting from
the network trained on the first screen (frozen but for the last block, or fine-tuned).
Writes benchmarks/out/images/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


#: every augmentation off (a model's augmentation is laid over the defaults, which are on)
NONE = {"flips": False, "rotate90": False, "brightness": 0.0, "contrast": 0.0, "crop_scale": 1.0}


def speed(images, y, shape, architecture: str, augmentation: dict, epochs: int, repeats: int = 3) -> dict:
    """Median images/s of ``repeats`` fits (each ``epochs`` epochs) and predictions."""
    from cellatlas.deep.estimator import CNNClassifier

    train, infer = [], []
    for _ in range(repeats):
        model = CNNClassifier(image_shape=shape, architecture=architecture, augmentation=augmentation,
                              max_epochs=epochs, patience=epochs, val_fraction=0.0, batch_size=64)
        model.fit(images, y)
        train.append(len(images) * model.fit_summary_["epochs"] / model.fit_summary_["train_seconds"])
        t = time.perf_counter()
        model.predict_proba(images)
        infer.append(len(images) / (time.perf_counter() - t))
    return {"architecture": architecture, "augmentation": augmentation != NONE, "epochs": model.fit_summary_["epochs"],
            "repeats": repeats, "train_images_per_s": round(float(np.median(train)), 1),
            "inference_images_per_s": round(float(np.median(infer)), 1), "device": model.fit_summary_["device"]}


def augmentation_alone(images, shape, augmentation: dict, batch: int = 64, repeats: int = 20) -> float:
    import torch

    from cellatlas.deep.vision import augment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(images[:batch]).view(-1, *shape).to(device)
    augment(x, augmentation)
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            augment(x, augmentation)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(batch * repeats / (time.perf_counter() - t))
    return round(float(np.median(rates)), 1)


def cv(images, y, groups, shape, split, **params) -> list[float]:
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from cellatlas.deep.estimator import CNNClassifier

    splitter = StratifiedGroupKFold(4) if split == "grouped" else StratifiedKFold(4, shuffle=True, random_state=0)
    scores = []
    for train, test in splitter.split(images, y, groups):
        model = CNNClassifier(image_shape=shape, max_epochs=12, patience=4,
                              augmentation={"flips": True, "rotate90": True, "brightness": 0.1, "contrast": 0.1},
                              **params)
        model.fit(images[train], y[train], groups=None if groups is None else groups[train])
        scores.append(float(f1_score(y[test], model.predict(images[test]), average="macro")))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="speed only")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    from cellatlas.images import image_shape
    from cellatlas.images.simulate import simulate_images

    out = HERE / "out" / "images"
    out.mkdir(parents=True, exist_ok=True)
    screen = simulate_images(n_plates=4, seed=5)
    shape = image_shape(screen)
    images, y = screen.X, screen.obs["label"].astype(str).to_numpy()
    plates = screen.obs["plate"].astype(str).to_numpy()
    aug = {"flips": True, "rotate90": True, "brightness": 0.1, "contrast": 0.1, "crop_scale": 0.85}
    result = {"machine": machine(), "threads": torch.get_num_threads(), "n_images": len(images), "shape": list(shape),
              "speed": [speed(images, y, shape, a, g, args.epochs)
                        for a in ("small_cnn", "resnet18") for g in (NONE, aug)],
              "augmentation_alone_images_per_s": augmentation_alone(images, shape, aug)}
    print(json.dumps(result, indent=2), flush=True)
    if not args.quick:
        t = time.perf_counter()
        result["grouped_by_plate"] = cv(images, y, plates, shape, "grouped")
        result["random_split"] = cv(images, y, None, shape, "random")
        small = simulate_images(n_plates=4, wells_per_class=1, fields_per_well=1, cells_per_field=6, seed=12)
        sy, sp = small.obs["label"].astype(str).to_numpy(), small.obs["plate"].astype(str).to_numpy()
        from cellatlas.deep.estimator import CNNClassifier

        source = CNNClassifier(image_shape=shape, max_epochs=12, patience=4,
                               augmentation={"flips": True, "rotate90": True}).fit(images, y, groups=plates)
        weights = out / "pretrained.pt"
        torch.save(source.net_.state_dict(), weights)
        result["small_scratch"] = cv(small.X, sy, sp, shape, "grouped")
        result["small_frozen"] = cv(small.X, sy, sp, shape, "grouped", init_weights=str(weights), freeze="all_but_last")
        result["small_tuned"] = cv(small.X, sy, sp, shape, "grouped", init_weights=str(weights), lr=3e-4)
        result["score_seconds"] = round(time.perf_counter() - t, 1)
    elif (out / "result.json").exists():  # speed again: the scores of the last full run stay
        result = {**json.loads((out / "result.json").read_text()), **result}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "speed"}, indent=2))


if __name__ == "__main__":
    main()
