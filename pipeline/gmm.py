"""Exact answers for a Gaussian-mixture dataset under EDM noise: denoiser, score, density, consistency function.

Data x0 ~ sum_k pi_k N(mu_k, s^2 I) in d = C*H*W dimensions; EDM noising x = x0 + sigma z. Then

  (G1) p_sigma(x) = sum_k pi_k N(x; mu_k, v I),  v = s^2 + sigma^2                     noisy marginal
  (G2) r_k(x, sigma) = softmax_k( ln pi_k - ||x - mu_k||^2 / (2 v) )                    responsibilities
  (G3) D*(x, sigma) = E[x0 | x] = sum_k r_k [ mu_k + s^2/v (x - mu_k) ]                 exact denoiser
  (G4) grad_x ln p_sigma(x) = (D*(x, sigma) - x) / sigma^2 = sum_k r_k (mu_k - x) / v    score (Tweedie)
  (G5) dx/dsigma = (x - D*(x, sigma)) / sigma                                           EDM PF-ODE
  (G6) f*(x, sigma) = solution of (G5) at sigma_min, started from x at sigma            consistency function
  (G7) K = 1: f*(x, sigma) = mu + (x - mu) sqrt((s^2 + sigma_min^2) / (s^2 + sigma^2))    closed form of (G6)
  (G8) mean m = sum_k pi_k mu_k, covariance S = s^2 I + sum_k pi_k (mu_k - m)(mu_k - m)^T   exact moments

At sigma_max = 80 >> the spread of the means, r_k ~ pi_k, so one Euler step of D* from sigma_max lands near m,
whereas f* lands on a mode: the mixture tells a consistency model from a one-step denoiser. Every computation is
float64; tensors come back in the caller's dtype. The sample measures (nll_per_dim, mode_coverage_tv, ...) are
exact functions of a sample set, with no feature network in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline import cm

SIGMA_MIN = 0.002
# Heun steps of consistency_function. Solver error ||f*(steps) - f*(2 steps)|| / ||f*(2 steps)|| over a batch
# (relative RMS), measured for K in {1, 10}, d = 3x4x4, means uniform in [-1, 1], s in {0.01, 0.05, 0.2, 0.5, 1}
# and sigma in {0.0021, 0.005, 0.02, 0.1, 0.5, 2, 10, 80}: <= 4.7e-7 at 4096 steps (1.9e-6 at 2048, 7.5e-6 at
# 1024: second order), worst at s = 1, sigma = 80. It is the error of the spread part f* - mu: measured against
# (G7) relative to ||f* - mu|| it reaches 2.6e-6 at 4096 steps (s = 0.01; 1.1e-6 at s = 0.2, 6.9e-7 at s = 1).
CONSISTENCY_STEPS = 4096


# The mean images of a generated mixture: K coloured shapes on a dark background, 8 x 8 pixels, so that a grid of
# samples reads at a glance. Pixel values span [-0.6, 0.6]: a draw with spread <= 0.1 stays inside [-1, 1].
RESOLUTION = 8
SHAPES = {
    "disc": lambda i, j: (i - 3.5) ** 2 + (j - 3.5) ** 2 <= 9,
    "cross": lambda i, j: ((i - 3.5).abs() < 1) | ((j - 3.5).abs() < 1),
    "square": lambda i, j: ((i == 1) | (i == 6) | (j == 1) | (j == 6)) & (i >= 1) & (i <= 6) & (j >= 1) & (j <= 6),
    "stripes": lambda i, j: i % 4 < 2,
    "diagonal": lambda i, j: (i - j).abs() <= 1,
    "checker": lambda i, j: (i // 2 + j // 2) % 2 == 0,
    "triangle": lambda i, j: (i >= 1) & ((j - 3.5).abs() <= (i - 1) / 2 + 0.5),
    "columns": lambda i, j: j % 4 < 2,
    "ring": lambda i, j: ((i - 3.5) ** 2 + (j - 3.5) ** 2 - 7.5).abs() <= 3,
    "corner": lambda i, j: (i < 4) & (j < 4),
}


def shape_means(components: int) -> torch.Tensor:
    """(K, 3, 8, 8) float64 mean images: shape k % 10 of SHAPES in hue k / K, on a dark background."""
    i, j = torch.meshgrid(torch.arange(RESOLUTION, dtype=torch.float64), torch.arange(RESOLUTION, dtype=torch.float64),
                          indexing="ij")
    shapes = list(SHAPES.values())
    means = torch.full((components, 3, RESOLUTION, RESOLUTION), -0.6, dtype=torch.float64)
    for k in range(components):
        hue = k / components  # a saturated colour: each channel a triangle wave of the hue, in [0, 1]
        rgb = [min(max(abs((hue * 6 + shift) % 6 - 3) - 1, 0.0), 1.0) for shift in (0, 4, 2)]
        mask = shapes[k % len(shapes)](i, j)
        for c in range(3):
            means[k, c][mask] = -0.4 + rgb[c]  # foreground in [-0.4, 0.6]: visible on the -0.6 background
    return means


def shape_mixture(components: int, spread: float) -> GaussianMixture:
    """The generated dataset of data.gmm: shape_means with unequal weights pi_k proportional to k + 1."""
    return GaussianMixture.from_means(shape_means(components), torch.arange(1, components + 1), spread)


def _f64(x: torch.Tensor | Sequence, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device=device)


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors has no single truth value; identity is equality
class GaussianMixture:
    """sum_k weights[k] N(means[k], spread^2 I) over images of shape means.shape[1:] = (C, H, W)."""

    weights: torch.Tensor  # (K,), float64, sums to 1
    means: torch.Tensor  # (K, C, H, W), float64
    spread: float  # s: every component is isotropic with standard deviation s

    def __post_init__(self) -> None:
        weights, means = _f64(self.weights).cpu(), _f64(self.means).cpu()
        if means.ndim != 4 or weights.shape != means.shape[:1]:
            raise ValueError(f"need weights (K,) and means (K, C, H, W), got {tuple(weights.shape)}, "
                             f"{tuple(means.shape)}")
        if (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-9 or not self.spread > 0:
            raise ValueError(f"need weights >= 0 summing to 1 and spread > 0, got {weights.tolist()}, {self.spread}")
        object.__setattr__(self, "weights", weights)  # frozen: the dataclass way to normalise fields once
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "spread", float(self.spread))

    @classmethod
    def from_means(
        cls, means: torch.Tensor | Sequence, weights: torch.Tensor | Sequence | None, spread: float
    ) -> GaussianMixture:
        """A mixture with the given means (K, C, H, W); weights are normalised to sum 1 (None: uniform)."""
        means = _f64(means)
        weights = torch.ones(len(means), dtype=torch.float64) if weights is None else _f64(weights)
        return cls(weights / weights.sum(), means, spread)

    @property
    def d(self) -> int:
        return math.prod(self.means.shape[1:])

    def to_dict(self) -> dict:
        """Plain Python lists and floats, for a JSON manifest; float64 -> float is exact, so the round trip is."""
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "spread": self.spread}

    @classmethod
    def from_dict(cls, data: dict) -> GaussianMixture:
        return cls(_f64(data["weights"]), _f64(data["means"]), float(data["spread"]))

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws x0 (n, C, H, W) float64 and the index (n,) of the component each came from."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return self.means[k] + self.spread * z, k

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact mean m (d,) and covariance S (d, d) of the data, flattened (G8)."""
        mu = self.means.flatten(1)
        m = self.weights @ mu
        centred = mu - m
        between = centred.T @ (self.weights[:, None] * centred)  # sum_k pi_k (mu_k - m)(mu_k - m)^T
        return m, self.spread**2 * torch.eye(self.d, dtype=torch.float64) + between

    # --- exact functions of (x, sigma) ---------------------------------------------------------------------

    def _variance(self, x: torch.Tensor, sigma: cm.Time) -> torch.Tensor:
        """v = s^2 + sigma^2 per sample, shape (B, 1), float64 on x's device."""
        sigma = _f64(sigma, x.device)
        return (self.spread**2 + sigma.square()).expand(x.shape[0]).reshape(-1, 1)

    def _logits(self, x: torch.Tensor, sigma: cm.Time) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ln pi_k - ||x - mu_k||^2 / (2 v), v, flat x) in float64: the exponent of (G1) and (G2), shape (B, K)."""
        x = x.flatten(1).to(torch.float64)
        mu = self.means.to(x.device).flatten(1)
        v = self._variance(x, sigma)
        # Expanded square: a (B, K) matmul instead of a (B, K, d) difference; float64 keeps its cancellation
        # error (~1e-16 ||x||^2) far below one nat even at sigma = 80.
        sq = x.square().sum(1, keepdim=True) - 2 * x @ mu.T + mu.square().sum(1)
        return self.weights.to(x.device).log() - sq / (2 * v), v, x

    def log_responsibilities(self, x: torch.Tensor, sigma: cm.Time) -> torch.Tensor:
        """ln r_k(x, sigma), shape (B, K), in x's dtype (G2). Log space: at small sigma logits differ by 1000s."""
        logits, _, _ = self._logits(x, sigma)
        return torch.log_softmax(logits, dim=1).to(x.dtype)

    def log_density(self, x: torch.Tensor, sigma: cm.Time) -> torch.Tensor:
        """ln p_sigma(x), shape (B,), in x's dtype (G1)."""
        logits, v, _ = self._logits(x, sigma)
        return (logits.logsumexp(1) - self.d / 2 * torch.log(2 * math.pi * v[:, 0])).to(x.dtype)

    def _posterior(self, x: torch.Tensor, sigma: cm.Time) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum_k r_k mu_k, v, flat x), all float64 and flat (B, d)."""
        logits, v, x64 = self._logits(x, sigma)
        return torch.softmax(logits, dim=1) @ self.means.to(x.device).flatten(1), v, x64

    def denoiser(self, x: torch.Tensor, sigma: cm.Time) -> torch.Tensor:
        """D*(x, sigma) = E[x0 | x] (G3), as sum_k r_k mu_k + s^2/v (x - sum_k r_k mu_k). A `cm.Denoiser`."""
        mean_mu, v, x64 = self._posterior(x, sigma)
        return (mean_mu + self.spread**2 / v * (x64 - mean_mu)).reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, sigma: cm.Time) -> torch.Tensor:
        """grad_x ln p_sigma(x) = sum_k r_k (mu_k - x) / v (G4): the right-hand form stays finite at sigma = 0."""
        mean_mu, v, x64 = self._posterior(x, sigma)
        return ((mean_mu - x64) / v).reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def consistency_function(
        self, x: torch.Tensor, sigma: cm.Time, sigma_min: float = SIGMA_MIN, steps: int = CONSISTENCY_STEPS
    ) -> torch.Tensor:
        """f*(x, sigma) (G6): the PF-ODE (G5) from sigma to sigma_min, Heun on a per-sample Karras grid (rho = 7).

        sigma: a float or one per sample (B,). At sigma == sigma_min every step has zero length, so f* = x exactly.
        Solver error at the default 4096 steps <= 4.7e-7 relative RMS for sigma in [0.002, 80] (CONSISTENCY_STEPS);
        it falls 4x per doubling of steps.
        """
        x64 = x.to(torch.float64)
        sigma = _f64(sigma, x.device).expand(x.shape[0])
        # EDM eq. 5 from each sample's own sigma: sigma_j = (sigma^(1/rho) + j/steps (sigma_min^(1/rho) -
        # sigma^(1/rho)))^rho, with exact end points.
        rho, j = 7.0, torch.arange(steps + 1, dtype=torch.float64, device=x.device)[:, None] / steps
        grid = (sigma ** (1 / rho) + j * (sigma_min ** (1 / rho) - sigma ** (1 / rho))) ** rho
        grid[0], grid[-1] = sigma, sigma_min
        grid = torch.where(sigma == sigma_min, sigma_min, grid)  # pow() rounding must not leave 1-ulp steps there
        for t, t_next in zip(grid[:-1], grid[1:]):
            x64 = cm.heun_step(self.denoiser, x64, t, t_next)
        return x64.to(x.dtype)

    # --- exact measures of a sample set y (n, C, H, W) ----------------------------------------------------------

    def nll_per_dim(self, y: torch.Tensor) -> float:
        """mean_i [-ln p_0(y_i)] / d, in nats per dimension (G1 at sigma = 0)."""
        return -float(self.log_density(y.to(torch.float64), 0.0).mean()) / self.d

    def nll_gap(self, y: torch.Tensor, n_true: int, generator: torch.Generator | None = None) -> float:
        """nll_per_dim(y) minus that of n_true fresh true draws: ~0 (within sampling noise) for a perfect sampler."""
        return self.nll_per_dim(y) - self.nll_per_dim(self.sample(n_true, generator)[0])

    def _modes(self, y: torch.Tensor) -> torch.Tensor:
        """The most likely component argmax_k r_k(y_i, 0) of each sample, shape (n,)."""
        return self.log_responsibilities(y.to(torch.float64), 0.0).argmax(1).cpu()

    def mode_coverage_tv(self, y: torch.Tensor) -> float:
        """0.5 sum_k |hist_k - pi_k|, hist the share of samples whose most likely component is k: 0 is perfect."""
        hist = torch.bincount(self._modes(y), minlength=len(self.weights)).double() / len(y)
        return 0.5 * float((hist - self.weights).abs().sum())

    def on_mode_fraction(self, y: torch.Tensor) -> float:
        """Share of samples within s (sqrt(d) + 3.1) of their most likely mean: ||z|| of a true draw exceeds
        sqrt(d) + 3.1 with probability <= 4.2e-5 for any d (1.4e-5 at d = 48, 6.7e-6 at 3072)."""
        distance = (y.to(torch.float64).cpu() - self.means[self._modes(y)]).flatten(1).norm(dim=1)
        return float((distance <= self.spread * (math.sqrt(self.d) + 3.1)).double().mean())

    def frechet_to_truth(self, y: torch.Tensor) -> float:
        """Frechet distance between the Gaussians of y's sample mean/covariance and the exact m, S (G8)."""
        from pipeline.metrics import feature_statistics, frechet_distance  # clean-fid is slow to import

        mu_y, cov_y = feature_statistics(y.to(torch.float64).flatten(1).cpu().numpy())
        m, s = self.mean_and_covariance()
        return frechet_distance(mu_y, cov_y, m.numpy(), s.numpy())

    def measures(self, y: torch.Tensor, reference_nll: float) -> dict[str, float]:
        """Every exact measure of a sample set y, the NLL beside reference_nll (that of true draws): precision (NLL
        gap, on-mode fraction), recall (mode-coverage TV) and both (Frechet distance to the exact moments)."""
        nll = self.nll_per_dim(y)
        return {"nll": nll, "nll_gap": nll - reference_nll, "mode_tv": self.mode_coverage_tv(y),
                "on_mode": self.on_mode_fraction(y), "frechet": self.frechet_to_truth(y)}

    # --- errors of a learned denoiser or consistency function -------------------------------------------------

    def _error(self, model: Callable, exact: Callable, sigmas: Sequence[float], n: int,
               generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str) -> dict[float, float]:
        errors = {}
        for sigma in sigmas:
            x0, _ = self.sample(n, generator)
            x = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)  # x ~ p_sigma (G1)
            with torch.no_grad():
                got = model(x.to(device, dtype), torch.full((n,), sigma, dtype=dtype, device=device))
            diff = got.to(torch.float64).cpu() - exact(x, sigma)
            errors[float(sigma)] = float(diff.square().flatten(1).sum(1).mean()) / self.d
        return errors

    def consistency_error(
        self, f: cm.ConsistencyFn, sigmas: Sequence[float], n: int, generator: torch.Generator | None = None,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", steps: int = CONSISTENCY_STEPS,
    ) -> dict[float, float]:
        """{sigma: E ||f(x, sigma) - f*(x, sigma)||^2 / d} over n draws x ~ p_sigma. f gets x and a per-sample
        sigma (n,) in dtype on device (float32: a network's), in one batch; f* takes `steps` Heun steps."""
        exact = lambda x, sigma: self.consistency_function(x, sigma, steps=steps)
        return self._error(f, exact, sigmas, n, generator, dtype, device)

    def denoiser_error(
        self, denoiser: cm.Denoiser, sigmas: Sequence[float], n: int, generator: torch.Generator | None = None,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> dict[float, float]:
        """{sigma: E ||D(x, sigma) - D*(x, sigma)||^2 / d} over n draws x ~ p_sigma, called as consistency_error."""
        return self._error(denoiser, self.denoiser, sigmas, n, generator, dtype, device)
