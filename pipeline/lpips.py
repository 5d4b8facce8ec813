"""LPIPS (Zhang et al. 2018, v0.1, VGG16 backbone) and the training distance d(x, y) of CD and CT.

LPIPS needs two weight files that cannot be fetched at run time here: torchvision's ImageNet VGG16
and the LPIPS v0.1 linear layers. As in the paper, inputs below 256x256 are upsampled bilinearly to
224x224 first (App. C). pooling 'avg' puts average pooling in VGG's five max-pooling layers, as piq's
LPIPS(replace_pooling=True) that the official PyTorch code trains with; its input normalisation (ImageNet mean
and std on [0, 1]) is LPIPS' shift and scale on [-1, 1], so the pooling is the only difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import cm
from pipeline.config import Lpips, LpipsWeightsMissing, require_lpips_weights

LAYER_ENDS = (4, 9, 16, 23, 30)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (phi_l(x)/|phi_l(x)| - phi_l(y)/|phi_l(y)|) ||^2, x, y in [-1, 1]."""

    def __init__(self, vgg16_state: dict | None = None, linear_state: dict | None = None,
                 pooling: str = "max") -> None:
        super().__init__()
        import torchvision

        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        features = torchvision.models.vgg16(weights=None).features
        if vgg16_state is not None:
            prefix = "features."
            features.load_state_dict({k[len(prefix):]: v for k, v in vgg16_state.items() if k.startswith(prefix)})
        if pooling == "avg":  # no weights in pooling layers: the same state dict either way
            for i, layer in enumerate(features):
                if isinstance(layer, nn.MaxPool2d):
                    features[i] = nn.AvgPool2d(kernel_size=2, stride=2)
        starts = (0,) + LAYER_ENDS[:-1]
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, LAYER_ENDS))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        if linear_state is not None:
            for i, lin in enumerate(self.lins):
                lin.weight.data.copy_(linear_state[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    @classmethod
    def from_files(cls, paths: Lpips) -> LPIPS:
        require_lpips_weights(paths)
        return cls(torch.load(paths.vgg16_weights, map_location="cpu", weights_only=True),
                   torch.load(paths.linear_weights, map_location="cpu", weights_only=True), paths.pooling)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for block, lin in zip(self.slices, self.lins):
            h_x, h_y = block(h_x), block(h_y)
            n_x = h_x / (h_x.square().sum(1, keepdim=True).sqrt() + 1e-10)
            n_y = h_y / (h_y.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((n_x - n_y).square()).mean((1, 2, 3))
        return total


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def training_distance(metric: str, paths: Lpips, device: torch.device) -> Distance:
    """The per-sample distance of the CD/CT loss (paper eq. 9); LPIPS fails here, before training starts."""
    if metric != "lpips":
        return cm.loss_metric(metric)
    try:
        lpips = LPIPS.from_files(paths).to(device)
    except LpipsWeightsMissing as e:
        raise SystemExit(f"error: {e}") from None

    def lpips_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 256:
            x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=224, mode="bilinear", align_corners=False)
        return lpips(x, y)

    return lpips_distance
