"""The mathematics of Consistency Models (Song et al., 2023) and EDM (Karras et al., 2022).

Every stage imports its formulas from here. Tensors in, tensors out; `sigma` is the noise level,
which is also the time t of the probability-flow ODE (EDM's sigma(t) = t).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, sigma) -> denoised x
Time = torch.Tensor | float  # a scalar time or one per sample, shape (B,)
ConsistencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(x, sigma) -> x at eps


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The n noise levels of EDM, descending from sigma_max to sigma_min (EDM eq. 5)."""
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    inv_rho_max, inv_rho_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_rho_max + i / (n - 1) * (inv_rho_min - inv_rho_max)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact end points despite rounding
    return sigmas.float()


def _as_tensor(sigma: torch.Tensor | float) -> torch.Tensor:
    return sigma if torch.is_tensor(sigma) else torch.tensor(float(sigma))


def consistency_scalings(
    sigma: torch.Tensor | float, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of the consistency parametrisation; f(x, sigma_min) = x (paper App. C)."""
    sigma = _as_tensor(sigma)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def edm_scalings(
    sigma: torch.Tensor | float, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of EDM's denoiser preconditioning (EDM Table 1)."""
    sigma = _as_tensor(sigma)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample sigma of shape (B,) against x of shape (B, ...)."""
    sigma = _as_tensor(sigma).to(device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def euler_step(denoiser: Denoiser, x: torch.Tensor, t: Time, t_next: Time) -> torch.Tensor:
    """One Euler step of the PF ODE dx/dt = (x - D(x, t)) / t from t to t_next (paper Alg. 2)."""
    t_b, t_next_b = _per_sample(t, x), _per_sample(t_next, x)
    d = (x - denoiser(x, t_b.flatten())) / t_b
    return x + (t_next_b - t_b) * d


def heun_step(denoiser: Denoiser, x: torch.Tensor, t: Time, t_next: Time) -> torch.Tensor:
    """One Heun (2nd-order) step of the PF ODE from t to t_next > 0 (EDM Alg. 1, lines 5-8)."""
    t_b, t_next_b = _per_sample(t, x), _per_sample(t_next, x)
    d = (x - denoiser(x, t_b.flatten())) / t_b
    x_euler = x + (t_next_b - t_b) * d
    d_next = (x_euler - denoiser(x_euler, t_next_b.flatten())) / t_next_b
    return x + (t_next_b - t_b) * (d + d_next) / 2


def ct_schedule(k: int, K: int, s0: int, s1: int, mu0: float, variant: str = "paper") -> tuple[int, float]:
    """The adaptive discretisation N(k) and target EMA rate mu(k) of consistency training (paper App. C).

    variant="paper": N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, mu(k) = exp(s0 ln(mu0) / N(k)).
    variant="code": the official code, which divides by N(k) - 1 (clamped to >= 1) instead.
    """
    root = math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2)
    if variant == "paper":
        n = math.ceil(root - 1) + 1
        return n, math.exp(s0 * math.log(mu0) / n)
    if variant == "code":
        scales = max(math.ceil(root - 1), 1)
        return scales + 1, math.exp(s0 * math.log(mu0) / scales)
    raise ValueError(f"unknown ct_schedule variant {variant!r} (expected 'paper' or 'code')")


def ict_schedule(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))."""
    stage_length = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / max(stage_length, 1)), s1) + 1


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discretised log-normal over the pairs (sigmas[n], sigmas[n+1]) of a descending grid:
    P(n) prop. to erf((ln sigmas[n] - P_mean) / (sqrt(2) P_std)) - erf((ln sigmas[n+1] - P_mean) / (sqrt(2) P_std))."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[:-1] - cdf[1:]
    return (p / p.sum()).to(sigmas.dtype)


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0,
          mapping: str = "sigmoid") -> torch.Tensor:
    """ECT's mapping r(t) at stage a: r = t (1 - q^-(a+1) n(t)), n(t) = 1 + k sigmoid(-b t) (n = 1: 'const'),
    clamped at 0 (where r = 0 the target is the clean image)."""
    n = 1 + k * torch.sigmoid(-b * t) if mapping == "sigmoid" else torch.ones_like(t)
    return (t * (1 - q ** -(stage + 1) * n)).clamp(min=0)


@torch.no_grad()
def multistep_sample(
    f: ConsistencyFn,
    x_T: torch.Tensor,
    sigmas: list[float] | torch.Tensor,
    generator: torch.Generator | None = None,
    sigma_min: float = 0.002,
    clip: bool = True,
    noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (paper Alg. 1). x_T = sigmas[0] * z; sigmas non-increasing (a repeated
    time, as the official search's index 0 gives for (sigma_max, sigma_max), is a valid step: noise again to it).

    After each evaluation of f the sample is clamped to the data range [-1, 1] (as the paper) unless
    clip=False. noise(x): the z of a step, shaped like x (default: one draw from `generator` for the batch;
    pipeline.generate draws it per image, so an image depends on its seed alone).
    """
    sigmas = [float(s) for s in sigmas]
    if any(b > a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"multistep_sample needs descending sigmas, got {sigmas}")
    x = f(x_T, torch.full((x_T.shape[0],), sigmas[0], device=x_T.device, dtype=x_T.dtype))
    x = x.clamp(-1, 1) if clip else x
    for tau in sigmas[1:]:
        if noise is None:
            noise_device = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=noise_device, dtype=x.dtype).to(x.device)
        else:
            z = noise(x)
        x = x + math.sqrt(tau**2 - sigma_min**2) * z
        x = f(x, torch.full((x.shape[0],), tau, device=x.device, dtype=x.dtype))
        x = x.clamp(-1, 1) if clip else x
    return x


@torch.no_grad()
def euler_sample(denoiser: Denoiser, x_T: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler steps of the PF ODE through the n + 1 given sigmas: n evaluations, ending at sigmas[-1] (sigma_min,
    where a consistency model's sample also stands). One step from sigma_max is about D(x_T, sigma_max)."""
    sigmas = torch.as_tensor(sigmas, dtype=x_T.dtype, device=x_T.device)
    x = x_T
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(denoiser, x, t, t_next)
    return x


@torch.no_grad()
def heun_sample(denoiser: Denoiser, x_T: torch.Tensor, sigmas: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """EDM's deterministic Heun sampler (EDM Alg. 1): 2n-1 evaluations for n sigmas, then sigma = 0.

    x_T = sigmas[0] * z. Heun steps between consecutive sigmas, a final Euler step to 0. clip: every denoised
    output D(x, sigma) is clamped to [-1, 1] before it is used (the official PyTorch karras_sample).
    """
    if clip:
        unclipped = denoiser
        denoiser = lambda x, sigma: unclipped(x, sigma).clamp(-1, 1)
    sigmas = torch.as_tensor(sigmas, dtype=x_T.dtype, device=x_T.device)
    x = x_T
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        x = heun_step(denoiser, x, t, t_next)
    return denoiser(x, sigmas[-1].expand(x.shape[0]))  # the Euler step to sigma = 0 lands on D(x)


def loss_metric(name: str, pseudo_huber_c: float | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The distance d(x, y) per sample (paper eq. 9): l2 (mean squared), l1 (mean absolute), pseudo_huber.

    pseudo_huber (iCT): sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d) unless given. LPIPS lives in
    pipeline.lpips because it needs network weights.
    """
    if name == "l2":
        return lambda x, y: (x - y).square().flatten(1).mean(1)
    if name == "l1":
        return lambda x, y: (x - y).abs().flatten(1).mean(1)
    if name == "pseudo_huber":

        def pseudo_huber(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            c = pseudo_huber_c if pseudo_huber_c is not None else 0.00054 * math.sqrt(x[0].numel())
            return ((x - y).square().flatten(1).sum(1) + c**2).sqrt() - c

        return pseudo_huber
    raise ValueError(f"unknown metric {name!r} (expected l2, l1, pseudo_huber or lpips)")
