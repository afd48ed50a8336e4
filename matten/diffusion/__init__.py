"""Gaussian diffusion for training (schedule, L_simple + L_vlb with learned-range variance) and the diffusers
schedulers that sample with the same betas."""

from .losses import diffusion_loss, discretized_gaussian_log_likelihood, normal_kl
from .schedule import GaussianDiffusion, linear_betas, make_scheduler

__all__ = ["GaussianDiffusion", "linear_betas", "make_scheduler", "diffusion_loss", "normal_kl",
           "discretized_gaussian_log_likelihood"]
