"""Convolutional networks for images of cells: the networks, the augmentation and the training
plan behind :class:`cellatlas.deep.estimator.CNNClassifier`.

* The estimator's rows are images flattened (channels x height x width, :mod:`cellatlas.images`);
  ``image_shape`` gives them back their shape.
* Per-channel mean and standard deviation are computed on the rows passed to ``fit`` (the
  training part of a fold) and travel with the network: nothing of a test fold is seen.
* Augmentation is applied on the fly to training batches only, on the whole batch at once on
  the batch's device (flips, 90-degree rotations, brightness and contrast, random resized
  crops): no per-image Python loop, so decoding and augmentation never hold the network up.
* Transfer learning: ``init_weights`` names a state dict on disk (a torchvision ResNet-18's, or
  a checkpoint of a model this pipeline trained); tensors whose name and shape match are loaded
  (a new head is trained for the new classes), and ``freeze="all_but_last"`` trains only the
  last block and the head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cellatlas.deep.estimator import ARCHITECTURES
from cellatlas.deep.plans import ClassifierSteps
from cellatlas.errors import CellAtlasError

log = logging.getLogger(__name__)



class SmallCNN(nn.Module):
    """Three conv blocks (conv, batch norm, ReLU, max-pool; 32, 64, 128 channels), global average
    pooling and a linear head: a few hundred thousand weights, trains on a CPU in seconds."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 32, dropout: float = 0.2):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2))
            for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(chans[-1], n_classes))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def tail(self) -> list[nn.Module]:
        """What ``freeze="all_but_last"`` leaves trainable."""
        return [self.blocks[-1], self.head]


class _BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) with torchvision's layer names, so that a torchvision
    ``resnet18`` state dict loads into it; the first convolution takes ``in_channels``.

    Written out here because torchvision cannot be installed beside the CPU build of torch
    from the package indexes this project installs from: PyPI's torchvision wheels are built
    against the CUDA build and fail to import (``operator torchvision::nms does not exist``).
    """

    def __init__(self, in_channels: int, n_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths, inplanes = (64, 128, 256, 512), 64
        for i, planes in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(inplanes, planes, stride), _BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, n_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tail(net: nn.Module) -> list[nn.Module]:
    """The last block and the head: what ``freeze="all_but_last"`` leaves trainable."""
    return net.tail() if isinstance(net, SmallCNN) else [net.layer4, net.fc]


def build_network(architecture: str, in_channels: int, n_classes: int, dropout: float = 0.2) -> nn.Module:
    if architecture == "small_cnn":
        return SmallCNN(in_channels, n_classes, dropout=dropout)
    if architecture == "resnet18":
        return ResNet18(in_channels, n_classes)
    raise ValueError(f"unknown architecture '{architecture}' (one of {ARCHITECTURES})")


def augment(x: torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    """A batch (B, C, H, W, values in [0, 1]) augmented per image, all on the batch's device.

    ``spec``: ``flips`` (bool), ``rotate90`` (bool; square images), ``brightness`` and
    ``contrast`` (largest relative change), ``crop_scale`` (smallest side of a random crop, as
    a share of the image, resized back; 1: no crop).
    """
    b = x.shape[0]
    dev = x.device

    def coin():
        return (torch.rand(b, device=dev) < 0.5).view(b, 1, 1, 1)

    if spec.get("flips", False):
        x = torch.where(coin(), x.flip(-1), x)
        x = torch.where(coin(), x.flip(-2), x)
    if spec.get("rotate90", False) and x.shape[-1] == x.shape[-2]:
        k = torch.randint(0, 4, (b,), device=dev)
        turned = torch.stack([torch.rot90(x, i, dims=(-2, -1)) for i in range(4)])
        x = turned[k, torch.arange(b, device=dev)]
    scale = float(spec.get("crop_scale", 1.0))
    if scale < 1.0:
        s = scale + (1.0 - scale) * torch.rand(b, device=dev)
        shift = (1.0 - s)[:, None] * (2 * torch.rand(b, 2, device=dev) - 1)
        theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 1, 1] = s, s
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    c, br = float(spec.get("contrast", 0.0)), float(spec.get("brightness", 0.0))
    if c > 0:
        factor = 1 + c * (2 * torch.rand(b, 1, 1, 1, device=dev) - 1)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = (x - mean) * factor + mean
    if br > 0:
        x = x * (1 + br * (2 * torch.rand(b, 1, 1, 1, device=dev) - 1))
    return x


class ImagePlan(ClassifierSteps):
    """Cross-entropy training of a network on images, augmented in the training step; its steps
    and per-epoch metrics are the MLP's (:class:`~cellatlas.deep.plans.ClassifierSteps`)."""

    def __init__(self, shape: Sequence[int], n_classes: int, architecture: str = "small_cnn", dropout: float = 0.2,
                 lr: float = 1e-3, weight_decay: float = 0.0, class_weights: Sequence[float] | None = None,
                 augmentation: Mapping[str, Any] | None = None, mean: Sequence[float] | None = None,
                 sd: Sequence[float] | None = None, freeze: str = "none"):
        super().__init__()
        self.save_hyperparameters()
        c = int(shape[0])
        self.net = build_network(architecture, c, n_classes, dropout)
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else [0.0] * c).view(1, c, 1, 1).float())
        self.register_buffer("sd", torch.as_tensor(sd if sd is not None else [1.0] * c).view(1, c, 1, 1).float())
        w = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", w, persistent=False)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.hparams.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of flattened images (values as read, in [0, 1])."""
        return self.net((self.images(x) - self.mean) / self.sd)

    def freeze_all_but_last(self) -> None:
        for p in self.net.parameters():
            p.requires_grad_(False)
        for module in tail(self.net):
            for p in module.parameters():
                p.requires_grad_(True)

    def _frozen_norms(self) -> list[nn.Module]:
        trainable = {id(m) for block in tail(self.net) for m in block.modules()}
        return [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in trainable]

    def on_train_epoch_start(self) -> None:
        # a frozen block keeps its batch-norm statistics too: evaluation mode, not the new data's
        if self.hparams.freeze == "all_but_last":
            for m in self._frozen_norms():
                m.eval()

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a training batch, augmented as images before they are normalized."""
        images = augment(self.images(x), self.hparams.augmentation or {})
        return self.net((images - self.mean) / self.sd)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def load_weights(net: nn.Module, path: str) -> int:
    """Load the tensors of ``path`` whose names and shapes match ``net``'s; how many were loaded.

    ``path`` holds a state dict (torchvision's) or a Lightning checkpoint of an :class:`ImagePlan`.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CellAtlasError(f"init_weights '{path}': cannot read it as a PyTorch state dict ({e})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = {k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")}
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not usable:
        raise CellAtlasError(f"init_weights '{path}': none of its {len(state)} tensors fits this network "
                             "(another architecture or channel count?)")
    net.load_state_dict(usable, strict=False)
    log.info("init_weights %s: %d of the network's %d tensors loaded", path, len(usable), len(own))
    return len(usable)
