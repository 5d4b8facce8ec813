"""Zero-shot editing with a consistency model (paper Algorithm 4 and Appendix D), and PSNR / SSIM.

`zero_shot_edit` is Algorithm 4, the one loop behind every task. Given an image y, an invertible linear
transform A (here always orthogonal, so A^-1 = A^T) and a mask Omega in A's space (1 = unknown, to be
generated; 0 = known), it starts from the known part and, for each time t_n of a descending schedule,
adds noise, applies the consistency function f and puts the known coefficients back:

    x <- x + sqrt(t_n^2 - eps^2) z;   x <- f(x, t_n);   x <- A^-1[(A y)(1 - Omega) + (A x) Omega]

The tasks differ only in A and Omega:

    inpainting        A = I, Omega = the missing pixels
    colorization      A = Q on the channels of each pixel, Q orthogonal 3x3 with first row along
                      (0.2989, 0.5870, 0.1140): the grey image is the known coefficient
    super-resolution  A = Q on each p x p patch of each channel, Q orthogonal p^2 x p^2 with first row
                      along (1, ..., 1): the patch means (the low-resolution image) are known
    stroke guidance   A = I, Omega all ones, started from the strokes themselves (SDEdit, two steps)

Denoising (one evaluation f(x_sigma, sigma)) and interpolation (slerp of two latents, then f(T z, T))
need no loop. Images are float NCHW in [-1, 1], as the model's; A maps an image to coefficients of the
same shape, so masks are images too. PSNR and SSIM take uint8 NHWC images, as saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import cm

GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 luma, the paper's grey image
SDEDIT_TIMES = (5.38, 2.24)  # the paper's two steps of stroke-guided generation
MASKS = ("center", "left_half", "random_pixels")


# ---------------------------------------------------------------------------------------------------
# Orthogonal transforms A.


@dataclass(frozen=True)
class OrthogonalTransform:
    """A linear map of images (B, C, H, W) onto coefficients of the same shape, and A^-1 = A^T."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


IDENTITY = OrthogonalTransform(forward=lambda x: x, inverse=lambda x: x)


def orthogonal_with_first_row(v: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix Q (float64) with Q[0] = v / |v|: the Householder reflection I - 2 w w^T / w^T w,
    w = e_1 - v / |v|, which swaps e_1 and v / |v| (Q is symmetric, so its first column is v / |v| too)."""
    v = torch.as_tensor(v, dtype=torch.float64)
    v = v / v.norm()
    w = -v
    w[0] += 1
    eye = torch.eye(len(v), dtype=torch.float64)
    if w.norm() < 1e-12:  # v is e_1 already
        return eye
    return eye - 2 * torch.outer(w, w) / w.dot(w)


def _mix_channels(Q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(Q x) at every pixel: out[:, i] = sum_j Q[i, j] x[:, j]."""
    return torch.einsum("ij,bjhw->bihw", Q.to(x), x)


def channel_transform(Q: torch.Tensor) -> OrthogonalTransform:
    """A = Q applied to the channel vector of each pixel."""
    return OrthogonalTransform(forward=lambda x: _mix_channels(Q, x), inverse=lambda c: _mix_channels(Q.T, c))


def _to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/p, W/p, p*p): the pixels of each p x p patch, row by row."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // p, w // p, p * p)


def _from_patches(patches: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of _to_patches: entry k of a patch goes to row k // p, column k % p of it."""
    b, c, hp, wp, _ = patches.shape
    return patches.reshape(b, c, hp, wp, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hp * p, wp * p)


def patch_transform(Q: torch.Tensor, p: int) -> OrthogonalTransform:
    """A = Q (p^2 x p^2) applied to each p x p patch of each channel; coefficient k sits where pixel k was."""
    return OrthogonalTransform(
        forward=lambda x: _from_patches(_to_patches(x, p) @ Q.T.to(x), p),
        inverse=lambda c: _from_patches(_to_patches(c, p) @ Q.to(c), p),
    )


def colorization_transform() -> tuple[OrthogonalTransform, torch.Tensor]:
    """(A, Omega) of colorization: Q with first row along GREY_WEIGHTS; coefficient 0 known, 1 and 2 not."""
    transform = channel_transform(orthogonal_with_first_row(GREY_WEIGHTS))
    return transform, torch.tensor([0.0, 1.0, 1.0]).reshape(1, 3, 1, 1)


def super_resolution_transform(p: int, resolution: int) -> tuple[OrthogonalTransform, torch.Tensor]:
    """(A, Omega) of super-resolution by p: coefficient 0 of a patch (= p * its mean, at its top-left pixel)
    known, the other p^2 - 1 not."""
    if p < 1 or resolution % p:
        raise ValueError(f"super-resolution factor {p} must divide the resolution {resolution}")
    mask = torch.ones(1, 1, resolution, resolution)
    mask[..., ::p, ::p] = 0
    return patch_transform(orthogonal_with_first_row(torch.ones(p * p)), p), mask


# ---------------------------------------------------------------------------------------------------
# Algorithm 4.


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def editing_times(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """The times of Algorithm 4: the Karras grid of `steps` levels without its last, sigma_min, where
    f(x, eps) = x makes the step a no-op (so steps - 1 evaluations)."""
    return cm.karras_sigmas(steps, sigma_min, sigma_max, rho)[:-1].tolist()


@torch.no_grad()
def zero_shot_edit(
    f: cm.ConsistencyFn,
    y: torch.Tensor,
    mask: torch.Tensor,
    times: Sequence[float],
    transform: OrthogonalTransform = IDENTITY,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_min: float = 0.002,
    clip: bool = True,
) -> torch.Tensor:
    """Zero-shot editing (paper Algorithm 4) of y with A = transform and Omega = mask (1 = unknown).

    x starts from the known part A^-1[(A y)(1 - Omega)] unless `start` is given (SDEdit starts from the
    strokes). f's output is clamped to [-1, 1] (clip=True, as Algorithm 1) before the known part is put
    back; the returned x is not clamped again, so its known part equals y's to float precision.
    """
    times = [float(t) for t in times]
    if any(b >= a for a, b in zip(times, times[1:])) or min(times) < sigma_min:
        raise ValueError(f"zero_shot_edit needs strictly descending times >= sigma_min, got {times}")
    known = transform.forward(y) * (1 - mask)  # (A y)(1 - Omega)
    x = transform.inverse(known) if start is None else start
    for t in times:
        x = x + math.sqrt(t**2 - sigma_min**2) * _randn_like(x, generator)  # x ~ N(x, (t_n^2 - eps^2) I)
        x = f(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
        x = x.clamp(-1, 1) if clip else x
        x = transform.inverse(known + transform.forward(x) * mask)  # A^-1[(A y)(1 - Omega) + (A x) Omega]
    return x


# ---------------------------------------------------------------------------------------------------
# The tasks of Appendix D.


def inpainting_mask(name: str, batch: int, resolution: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Omega (batch, 1, H, W), 1 = unknown: 'center' (the central half-size square), 'left_half', or
    'random_pixels' (each pixel unknown with probability 1/2)."""
    mask = torch.zeros(batch, 1, resolution, resolution)
    quarter, half = resolution // 4, resolution // 2
    if name == "center":
        mask[..., quarter:quarter + half, quarter:quarter + half] = 1
    elif name == "left_half":
        mask[..., :half] = 1
    elif name == "random_pixels":
        mask = (torch.rand(mask.shape, generator=generator) < 0.5).float()
    else:
        raise ValueError(f"unknown mask {name!r} (expected one of {', '.join(MASKS)})")
    return mask


def inpaint(f: cm.ConsistencyFn, image: torch.Tensor, mask: torch.Tensor, times: Sequence[float],
            **options) -> torch.Tensor:
    """Fill the pixels where mask = 1 (Algorithm 4 with A = I); only image * (1 - mask) is used."""
    return zero_shot_edit(f, image, mask, times, IDENTITY, **options)


def grey(x: torch.Tensor) -> torch.Tensor:
    """The grey image (B, 1, H, W): 0.2989 R + 0.5870 G + 0.1140 B."""
    return torch.einsum("c,bchw->bhw", torch.tensor(GREY_WEIGHTS).to(x), x).unsqueeze(1)


def colorize(f: cm.ConsistencyFn, grey_image: torch.Tensor, times: Sequence[float], **options) -> torch.Tensor:
    """Colour images whose grey (see `grey`) is grey_image (B, 1, H, W) (Algorithm 4, A = Q per pixel)."""
    transform, mask = colorization_transform()
    weights = torch.tensor(GREY_WEIGHTS).to(grey_image)
    y = grey_image * (weights / weights.square().sum()).reshape(1, 3, 1, 1)  # the least-norm colour of that grey
    return zero_shot_edit(f, y, mask.to(grey_image), times, transform, **options)


def patch_means(x: torch.Tensor, p: int) -> torch.Tensor:
    """The low-resolution image (B, C, H/p, W/p): the mean of every p x p patch."""
    return F.avg_pool2d(x, p)


def upsample(low_res: torch.Tensor, p: int) -> torch.Tensor:
    """Nearest-neighbour upsampling by p: each low-resolution pixel becomes a constant p x p patch."""
    return low_res.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)


def super_resolve(f: cm.ConsistencyFn, low_res: torch.Tensor, p: int, times: Sequence[float],
                  **options) -> torch.Tensor:
    """Images (B, C, pH, pW) whose p x p patch means are low_res (Algorithm 4, A = Q per patch)."""
    y = upsample(low_res, p)
    transform, mask = super_resolution_transform(p, y.shape[-1])
    return zero_shot_edit(f, y, mask.to(y), times, transform, **options)


def stroke_guided(f: cm.ConsistencyFn, strokes: torch.Tensor, times: Sequence[float] = SDEDIT_TIMES,
                  **options) -> torch.Tensor:
    """SDEdit: Algorithm 4 with A = I and Omega all ones, started from the stroke painting itself."""
    everything = torch.ones_like(strokes[:1, :1])
    return zero_shot_edit(f, strokes, everything, times, IDENTITY, start=strokes, **options)


@torch.no_grad()
def denoise(f: cm.ConsistencyFn, noisy: torch.Tensor, sigma: float, clip: bool = True) -> torch.Tensor:
    """One evaluation: x = f(x_sigma, sigma) for x_sigma = x + sigma z."""
    x = f(noisy, torch.full((noisy.shape[0],), float(sigma), device=noisy.device, dtype=noisy.dtype))
    return x.clamp(-1, 1) if clip else x


def slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: float) -> torch.Tensor:
    """sin((1 - a) psi) / sin(psi) z1 + sin(a psi) / sin(psi) z2, psi = arccos(z1.z2 / |z1||z2|), per sample
    (paper App. D); linear interpolation where z1 and z2 are parallel."""
    flat1, flat2 = z1.flatten(1), z2.flatten(1)
    cos_psi = (flat1 * flat2).sum(1) / (flat1.norm(dim=1) * flat2.norm(dim=1))
    psi = cos_psi.clamp(-1, 1).acos().reshape(-1, *([1] * (z1.ndim - 1)))
    sin_psi = psi.sin()
    parallel = sin_psi.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin_psi), sin_psi)
    spherical = (torch.sin((1 - alpha) * psi) * z1 + torch.sin(alpha * psi) * z2) / safe
    return torch.where(parallel, (1 - alpha) * z1 + alpha * z2, spherical)


@torch.no_grad()
def interpolate(f: cm.ConsistencyFn, z1: torch.Tensor, z2: torch.Tensor, alphas: Sequence[float],
                sigma_max: float = 80.0, clip: bool = True) -> torch.Tensor:
    """Images (B, len(alphas), C, H, W) along the slerp from latent z1 to z2: f(T z, T), one evaluation each."""
    sigma = torch.full((z1.shape[0],), float(sigma_max), device=z1.device, dtype=z1.dtype)
    frames = [f(sigma_max * slerp(z1, z2, float(alpha)), sigma) for alpha in alphas]
    x = torch.stack(frames, dim=1)
    return x.clamp(-1, 1) if clip else x


# ---------------------------------------------------------------------------------------------------
# Image quality against the ground truth (uint8 NHWC images, [0, 255]).


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per image: 10 log10(data_range^2 / MSE); inf where the images are identical."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = np.square(diff).reshape(len(diff), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-D Gaussian weights of SSIM (float64); the 2-D window is their outer product."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per image: the mean SSIM (Wang et al. 2004, eq. 13) over every position of an 11 x 11 Gaussian window
    (sigma 1.5) that fits inside the image, then over channels; K1 = 0.01, K2 = 0.03."""
    x, y = (torch.as_tensor(np.asarray(v), dtype=torch.float64).permute(0, 3, 1, 2) for v in (a, b))
    if x.shape != y.shape or min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim needs two (N, H, W, C) stacks of equal shape, H, W >= 11; got {a.shape}, {b.shape}")
    channels, g = x.shape[1], gaussian_window()
    rows, columns = g.reshape(1, 1, 11, 1).expand(channels, 1, 11, 1), g.reshape(1, 1, 1, 11).expand(channels, 1, 1, 11)
    blur = lambda t: F.conv2d(F.conv2d(t, rows, groups=channels), columns, groups=channels)  # separable window
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).numpy()
