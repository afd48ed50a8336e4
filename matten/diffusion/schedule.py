"""The forward process and the learned-range reverse variance (Nichol & Dhariwal 2021, "Improved DDPM", as DiT).

Notation: ``abar_t = prod_{s <= t} (1 - beta_s)``. Forward: ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``.
Posterior: ``q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)`` with
``mu~_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t`` and
``beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)``. The model predicts ``eps`` (for the mean, through
``x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``) and ``v`` in [-1, 1] for the variance:
``log Sigma_t = (v + 1)/2 log beta_t + (1 - (v + 1)/2) log beta~_t`` (beta~_0 = 0, so its log is clipped to beta~_1).
All tables are float64; values are gathered per timestep and cast to float32.
"""

from __future__ import annotations

import torch


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, rescaled as Improved DDPM does so other step counts keep the same curve (float64)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def _gather(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``table[t]`` as float32, shaped ``(B, 1, ..., 1)`` to broadcast over a tensor of ``ndim`` dimensions."""
    return table.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """Tables of the 1000-step (default) linear schedule and the maths that uses them."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps, self.beta_start, self.beta_end = num_timesteps, beta_start, beta_end
        betas = linear_betas(num_timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas = betas
        self.alphas_cumprod = abar
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)  # beta~_t; beta~_0 = 0
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)
        self.log_betas = torch.log(betas)

    def to(self, device) -> "GaussianDiffusion":
        """Move the tables to ``device`` (in place; returns self): no host-to-device copy per lookup, which a CUDA
        graph capture also requires."""
        for name, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, name, v.to(device))
        return self

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform ``t`` in ``[0, num_timesteps)``, int64 ``(batch,)``."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0.dim()) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log variance of ``q(x_{t-1} | x_t, x_0)``."""
        n = x0.dim()
        mean = _gather(self.posterior_mean_coef1, t, n) * x0 + _gather(self.posterior_mean_coef2, t, n) * x_t
        return mean, _gather(self.posterior_log_variance_clipped, t, n).expand_as(x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = x_t.dim()
        return _gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, n) * eps

    def learned_range_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v`` in [-1, 1] (model output) -> ``log Sigma_t``, interpolating ``log beta~_t`` (v=-1) .. ``log beta_t`` (v=1)."""
        n = v.dim()
        frac = (v + 1.0) / 2.0
        return frac * _gather(self.log_betas, t, n) + (1.0 - frac) * _gather(self.posterior_log_variance_clipped, t, n)

    def p_mean_variance(self, eps: torch.Tensor, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and log variance of the model's ``p(x_{t-1} | x_t)`` (no clipping of the predicted ``x_0``)."""
        mean, _ = self.q_posterior(self.predict_x0(x_t, t, eps), x_t, t)
        return mean, self.learned_range_log_variance(v, t)


def make_scheduler(kind: str = "ddim", diffusion: GaussianDiffusion | None = None, clip_sample: bool = False):
    """A diffusers scheduler over the same betas as ``diffusion``.

    ``"ddpm"``: ``DDPMScheduler`` with ``variance_type="learned_range"`` (the model's whole output is passed, the
    scheduler splits eps and v); ``"ddim"``: deterministic DDIM (eta 0), which uses eps only (the pipeline drops the
    variance half), with "trailing" spacing so that few steps still start from t = T - 1, and a last step onto
    the predicted x_0 (``set_alpha_to_one``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    d = diffusion or GaussianDiffusion()
    common = dict(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start * 1000.0 / d.num_timesteps,
                  beta_end=d.beta_end * 1000.0 / d.num_timesteps, beta_schedule="linear",
                  prediction_type="epsilon", clip_sample=clip_sample)
    if kind == "ddpm":
        return DDPMScheduler(variance_type="learned_range", **common)
    if kind == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, timestep_spacing="trailing", **common)
    raise ValueError(f"scheduler must be 'ddpm' or 'ddim', got {kind!r}")
