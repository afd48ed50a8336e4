"""L_simple + L_vlb (Improved DDPM, section 3.1; the hybrid loss DiT and Latte train with).

``L_simple`` is the mean squared error of the predicted noise. ``L_vlb`` is the variational bound term of timestep t:
``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for t > 0 and the discretised decoder NLL ``-log p(x_0 | x_1)`` for
t = 0, in bits per dimension. Inside ``L_vlb`` the predicted mean is detached (stop-gradient), so the bound trains the
variance only and the mean is trained by ``L_simple`` alone; the paper's lambda = 0.001 is absorbed by averaging over
dimensions, exactly as the reference implementations do (``loss = mse + vb``, both means over all dimensions).
"""

from __future__ import annotations

import math

import torch

from .schedule import GaussianDiffusion


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch -> ``(B,)``."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF (the one the DDPM decoder NLL is defined with)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of data ``x`` in [-1, 1], quantised to 256 bins of width 2/255, under
    ``N(means, exp(log_scales)^2)``; the edge bins take the whole tail."""
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def diffusion_loss(diffusion: GaussianDiffusion, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, learn_sigma: bool = True) -> dict[str, torch.Tensor]:
    """Per-sample losses ``{"loss", "mse", "vb"}`` (each ``(B,)``, float32) of one denoising step.

    ``model_output``: ``(B, 2C, ...)`` = (eps, v) with ``learn_sigma``, else ``(B, C, ...)`` = eps (then ``loss = mse``
    and ``vb`` is zero). ``x0, x_t, noise``: ``(B, C, ...)``; ``t``: int64 ``(B,)``.
    """
    c = x0.shape[1]
    want = 2 * c if learn_sigma else c
    if model_output.shape[1] != want or model_output.shape[2:] != x0.shape[2:]:
        raise ValueError(f"model_output must have shape (B, {want}, {', '.join(map(str, x0.shape[2:]))}) "
                         f"(learn_sigma={learn_sigma}), got {tuple(model_output.shape)}")
    out = model_output.float()
    eps = out[:, :c]
    mse = mean_flat((noise.float() - eps) ** 2)
    if not learn_sigma:
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
    v = out[:, c:]
    # stop-gradient on the mean: L_vlb trains only the variance (Improved DDPM sec. 3.1)
    mean, log_var = diffusion.p_mean_variance(eps.detach(), v, x_t.float(), t)
    true_mean, true_log_var = diffusion.q_posterior(x0.float(), x_t.float(), t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0.float(), mean, 0.5 * log_var)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
