"""Random numbers of a training step that do not depend on how the global batch is split.

Every value is a function of (seed, step, stream, global row, element): a counter-based generator (a keyed
32-bit integer hash, then Box-Muller for normals). Any slice of the global batch is drawn on its own, so one
process, eight processes and one process with gradient accumulation see the same noise z, noise levels and
indices n for the same images, on CPU and GPU alike, and a resumed run needs no generator state.
"""

from __future__ import annotations

import hashlib
import math

import torch

MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective mix of 32-bit values held in int64 (multipliers < 2^31: no product overflows int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def _key(*parts: int | str) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


class Noise:
    """The random numbers of rows [start, start + count) of step `step`'s global batch.

    A stream names one use (e.g. 0: noise levels, 1: Gaussian noise), so two uses never share values."""

    def __init__(self, seed: int, step: int, start: int, count: int, device: torch.device | str = "cpu"):
        self.seed, self.step, self.start, self.count, self.device = seed, step, start, count, torch.device(device)

    def _bits(self, stream: int, draw: int, numel: int) -> torch.Tensor:
        """(count, numel) uniform 32-bit integers, element e of row i a function of (keys, start + i, e)."""
        rows = torch.arange(self.start, self.start + self.count, device=self.device, dtype=torch.int64)
        counter = rows[:, None] * numel + torch.arange(numel, device=self.device, dtype=torch.int64)[None, :]
        low, high = counter & MASK32, counter >> 32  # high is 0 below 4.3e9 values per (step, stream)
        k1, k2 = _key(self.seed, self.step, stream, draw, 1), _key(self.seed, self.step, stream, draw, 2)
        return hash32(hash32(low ^ k1) ^ (high ^ k2))

    def _unit(self, stream: int, draw: int, numel: int) -> torch.Tensor:
        """(count, numel) uniforms in (0, 1), never exactly 0."""
        return (self._bits(stream, draw, numel).to(torch.float32) + 0.5) * 2.0**-32

    def uniform(self, stream: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """U(0, 1), never exactly 0, of shape (count, *shape)."""
        return self._unit(stream, 0, math.prod(shape)).reshape(self.count, *shape)

    def normal(self, stream: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """N(0, 1) of shape (count, *shape), by Box-Muller from two independent uniforms."""
        numel = math.prod(shape)
        u1 = self._unit(stream, 0, numel)
        u2 = self._bits(stream, 1, numel).to(torch.float32) * 2.0**-32  # cos needs no guard at 0
        z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return z.reshape(self.count, *shape)

    def integers(self, stream: int, high: int) -> torch.Tensor:
        """Uniform integers in {0, ..., high - 1}, one per row (modulo bias below high / 2^32)."""
        return self._bits(stream, 0, 1)[:, 0] % high

    def normal_like(self, stream: int, x: torch.Tensor) -> torch.Tensor:
        """N(0, 1) noise of x's shape (rows of x are rows of this slice), in x's dtype."""
        return self.normal(stream, tuple(x.shape[1:])).to(x.dtype)


class TorchNoise:
    """The same interface drawing from torch's global generator: for callers outside the training loop."""

    def __init__(self, count: int, device: torch.device | str = "cpu"):
        self.count, self.device = count, torch.device(device)

    def uniform(self, stream: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.rand(self.count, *shape, device=self.device)

    def normal(self, stream: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.randn(self.count, *shape, device=self.device)

    def integers(self, stream: int, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.count,), device=self.device)

    def normal_like(self, stream: int, x: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(x)


class SharedDropout:
    """The target network's dropout masks (cd/ct.target_dropout) are drawn from torch's generator of the device,
    like the online network's. 'shared': remember() before the target's forward and replay() before the online
    one, so both draw the same masks in a step (both official codes: JAX passes one dropout key to both; the
    PyTorch code restores torch.get_rng_state(), which replays the masks on the CPU only). 'none' and
    'independent' leave the generator alone. Under torch.compile, 'shared' switches Inductor to eager random ops
    (fallback_random): its own random kernels seed themselves per graph on CUDA, and replaying the generator's
    state would not replay their masks."""

    def __init__(self, mode: str, device: torch.device | str):
        if mode not in ("none", "shared", "independent"):
            raise ValueError(f"target_dropout must be none, shared or independent, got {mode!r}")
        self.shared, self.device, self.state = mode == "shared", torch.device(device), None
        if self.shared:
            from torch._inductor import config as inductor

            inductor.fallback_random = True

    def remember(self) -> None:
        if self.shared:
            self.state = (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                          else torch.get_rng_state())

    def replay(self) -> None:
        if self.shared and self.state is not None:
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(self.state, self.device)
            else:
                torch.set_rng_state(self.state)
            self.state = None
