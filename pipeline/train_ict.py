"""Stage train_ict: improved consistency training (iCT; Song & Dhariwal, ICLR 2024), no teacher.

    python -m pipeline.train_ict [--config params.yaml] [--set ict.weighting=uniform]

Algorithm 3 of the 2023 paper (pipeline.train_ct) on the `ict` section, whose knobs switch iCT's changes on; each is
a knob of `ct` too:
- target: online -- the target is the online network under no-grad (theta- = sg(theta), no target EMA), with the
  online pass's dropout mask (target_dropout: shared, replayed from the step device's generator); `ema` is only the
  sampling EMA;
- schedule: exponential -- N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1));
- index: lognormal -- P(n) of the level pair (sigma_n, sigma_{n+1}) prop. to the difference of
  erf((ln sigma - P_mean) / (sqrt(2) P_std)) at its ends (pipeline.cm.lognormal_index_probs);
- weighting: inverse_gap -- lambda(sigma_n) = 1 / (sigma_n - sigma_{n+1});
- metric: pseudo_huber -- sqrt(||x - y||^2 + c^2) - c on the whole per-sample vector, c = 0.00054 sqrt(d).
The network changes (NCSN++ Fourier scale 0.02, ADM without scale-shift norm) are the presets' network options.
"""

from __future__ import annotations

from pipeline.config import stage_cli
from pipeline.stages import training_io
from pipeline.train_ct import trainer
from pipeline.training import setup_training


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    training, fit_args = trainer(cfg, cfg.ict, setup_training(cfg), kind="ict", **training_io(cfg, "ict"))
    training.fit(**fit_args)


if __name__ == "__main__":
    main()
