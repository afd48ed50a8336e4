"""Diffusion maths (schedule, posterior, KL, decoder NLL, L_simple + L_vlb) and MattenPipeline sampling, on the CPU.

Tolerance rule: quantities computed here in float64 are compared to an independent float64 derivation at 1e-10
relative; quantities that pass through float32 (diffusers schedulers keep float32 tables, the loss runs in float32)
are compared at 1e-5 relative (1e-4 for accumulations over a thousand steps). Exactness (stop-gradient zeros,
telescoping bin probabilities) is asserted exactly or at 1e-6.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, DDPMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from matten.diffusion import GaussianDiffusion, diffusion_loss, discretized_gaussian_log_likelihood, make_scheduler, normal_kl
from matten.pipeline import MattenPipeline


@pytest.fixture(scope="module")
def diff():
    return GaussianDiffusion()


def test_linear_schedule_matches_diffusers(diff):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    err = (diff.alphas_cumprod.float() - sched.alphas_cumprod).abs().max().item()
    print("alphas_cumprod max abs diff vs diffusers:", err)
    assert err < 1e-4
    assert diff.betas[0].item() == pytest.approx(1e-4) and diff.betas[-1].item() == pytest.approx(0.02)


def test_posterior_matches_bayes_rule(diff):
    # q(x_{t-1} | x_t, x_0) from Bayes with q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and
    # q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t): precision adds, mean is precision-weighted.
    t = torch.tensor([1, 7, 300, 999])
    x0 = torch.tensor([0.3, -0.7, 0.1, 0.9], dtype=torch.float64)
    xt = torch.tensor([-0.2, 0.5, 1.3, -2.0], dtype=torch.float64)
    abar_prev = diff.alphas_cumprod[t - 1]
    beta = diff.betas[t]
    prec = 1 / (1 - abar_prev) + (1 - beta) / beta
    var = 1 / prec
    mean = var * (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - beta).sqrt() * xt / beta)
    ours_mean = diff.posterior_mean_coef1[t] * x0 + diff.posterior_mean_coef2[t] * xt
    print("posterior mean err", (ours_mean - mean).abs().max().item(), "var err",
          (diff.posterior_variance[t] - var).abs().max().item())
    torch.testing.assert_close(ours_mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diff.posterior_variance[t], var, rtol=1e-10, atol=1e-14)
    # the clipped log variance replaces beta~_0 = 0 by beta~_1
    assert diff.posterior_log_variance_clipped[0] == diff.posterior_log_variance_clipped[1]


def test_learned_range_endpoints(diff):
    t = torch.tensor([0, 5, 500, 999])
    lo = diff.learned_range_log_variance(-torch.ones(4, 1), t)[:, 0]
    hi = diff.learned_range_log_variance(torch.ones(4, 1), t)[:, 0]
    mid = diff.learned_range_log_variance(torch.zeros(4, 1), t)[:, 0]
    torch.testing.assert_close(lo, diff.posterior_log_variance_clipped[t].float())
    torch.testing.assert_close(hi, diff.betas[t].log().float())
    torch.testing.assert_close(mid, (lo + hi) / 2)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.0, -2.0), (0.7, -4.0), (-0.95, -1.0)):
        ll = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        total = ll.exp().sum().item()
        print(f"mean {mean} log_scale {log_scale}: sum of bin probabilities {total:.12f}")
        assert total == pytest.approx(1.0, abs=1e-6)


def test_vlb_is_zero_for_the_true_posterior(diff):
    # eps = noise recovers x0 exactly, and v = -1 is the posterior variance: KL(q || p) = 0 for every t > 0
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    xt = diff.q_sample(x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    losses = diffusion_loss(diff, out, x0, xt, t, noise)
    print("vb at the true posterior:", losses["vb"].tolist(), "mse:", losses["mse"].tolist())
    assert losses["mse"].abs().max() < 1e-12
    assert losses["vb"].abs().max() < 1e-4  # float32 rounding of the reconstructed x0 and the means


def test_vlb_at_t0_is_the_decoder_nll(diff):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 3, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.zeros(2, dtype=torch.long)
    xt = diff.q_sample(x0, t, noise)
    out = torch.randn(2, 6, 2, 4, 4, generator=g)
    losses = diffusion_loss(diff, out, x0, xt, t, noise)
    mean, logvar = diff.p_mean_variance(out[:, :3], out[:, 3:], xt, t)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3, 4)) / math.log(2)
    torch.testing.assert_close(losses["vb"], nll)


def test_vlb_trains_only_the_variance(diff):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 2, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 3, 700])
    xt = diff.q_sample(x0, t, noise)
    out = torch.randn(3, 4, 2, 4, 4, generator=g, requires_grad=True)
    losses = diffusion_loss(diff, out, x0, xt, t, noise)
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out, retain_graph=True)
    (g_all,) = torch.autograd.grad(losses["loss"].sum(), out)
    assert torch.count_nonzero(g_vb[:, :2]) == 0  # stop-gradient on the mean
    assert torch.count_nonzero(g_vb[:, 2:]) > 0
    assert torch.count_nonzero(g_mse[:, 2:]) == 0
    torch.testing.assert_close(g_all, g_vb + g_mse)
    # eps half: the gradient of L_simple, 2 (eps - noise) / numel per sample
    torch.testing.assert_close(g_mse[:, :2], 2 * (out[:, :2].detach() - noise) / noise[0].numel())
    with pytest.raises(ValueError, match="model_output must have shape"):
        diffusion_loss(diff, out[:, :3], x0, xt, t, noise)


def test_reverse_step_matches_diffusers_ddpm_learned_range(diff):
    """Our p(x_{t-1} | x_t) (mean, learned-range variance) is what DDPMScheduler samples with 1000 steps."""
    sched = make_scheduler("ddpm", diff)
    sched.set_timesteps(1000)
    g = torch.Generator().manual_seed(4)
    xt = torch.randn(2, 3, 2, 4, 4, generator=g)
    out = torch.randn(2, 6, 2, 4, 4, generator=g)
    out[:, 3:] = out[:, 3:].tanh()
    for t in (999, 500, 20, 1):
        tt = torch.full((2,), t)
        mean, logvar = diff.p_mean_variance(out[:, :3], out[:, 3:], xt, tt)
        step = sched.step(out, t, xt, generator=torch.Generator().manual_seed(t))
        noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t))
        ours = mean + (0.5 * logvar).exp() * noise
        err = (step.prev_sample - ours).abs().max().item()
        print(f"t={t}: max |diffusers - ours| = {err:.2e}")
        torch.testing.assert_close(step.prev_sample, ours, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step.pred_original_sample, diff.predict_x0(xt, tt, out[:, :3]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------------


class OracleTransformer(ModelMixin, ConfigMixin):
    """The exact denoiser of a data distribution that is a single clip x* (per class): eps = (x_t - sqrt(abar) x*) /
    sqrt(1 - abar). Sampling it with any correct scheduler must return x*; the variance half is constant ``v``."""

    @register_to_config
    def __init__(self, in_channels=3, num_frames=2, sample_size=4, num_classes=0, class_dropout_prob=0.0,
                 learn_sigma=True, v=0.0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("targets", torch.rand(max(num_classes, 1) + 1, in_channels, num_frames, sample_size,
                                                   sample_size, generator=g) * 1.6 - 0.8)
        self.abar = GaussianDiffusion().alphas_cumprod.float()

    def forward(self, hidden_states, timestep, class_labels=None, return_dict=True):
        idx = class_labels if class_labels is not None else torch.zeros(len(hidden_states), dtype=torch.long)
        x_star = self.targets[idx]
        a = self.abar[timestep.cpu()].to(hidden_states).reshape(-1, 1, 1, 1, 1)
        eps = (hidden_states - a.sqrt() * x_star) / (1 - a).sqrt()
        out = torch.cat([eps, torch.full_like(eps, self.config.v)], 1) if self.config.learn_sigma else eps
        return Transformer2DModelOutput(sample=out)


@pytest.mark.parametrize("kind,steps", [("ddim", 10), ("ddpm", 50)], ids=["ddim10", "ddpm50"])
def test_pipeline_recovers_the_oracle_clip(kind, steps):
    model = OracleTransformer()
    pipe = MattenPipeline(transformer=model, scheduler=make_scheduler(kind))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
    target = ((model.targets[0] + 1) / 2).permute(1, 2, 3, 0)  # (F, H, W, 3) in [0, 1]
    err = (out.frames - target).abs().max().item()
    print(f"{kind} {steps} steps: max error vs the oracle clip {err:.2e}")
    assert out.frames.shape == (2, 2, 4, 4, 3)
    assert err < (1e-3 if kind == "ddim" else 2e-2)


def test_pipeline_cfg_guides_towards_the_class():
    # conditional oracle: class k -> targets[k], null class (num_classes) -> targets[num_classes]
    model = OracleTransformer(num_classes=3, class_dropout_prob=0.1)
    pipe = MattenPipeline(transformer=model, scheduler=make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    out1 = pipe(batch_size=1, class_labels=2, num_inference_steps=10, generator=gen, output_type="latent")
    torch.testing.assert_close(out1.frames[0], model.targets[2], rtol=1e-3, atol=1e-3)
    # with scale s the guided eps is that of x* = null + s (cond - null): DDIM lands there
    out = pipe(batch_size=1, class_labels=[1], num_inference_steps=10, guidance_scale=1.5,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    want = model.targets[3] + 1.5 * (model.targets[1] - model.targets[3])
    print("cfg max err", (out.frames[0] - want).abs().max().item())
    torch.testing.assert_close(out.frames[0], want, rtol=1e-3, atol=1e-3)
    assert out.class_labels.tolist() == [1]
    with pytest.raises(ValueError, match="class_labels must lie"):
        pipe(batch_size=1, class_labels=3, num_inference_steps=2)
    unconditional = MattenPipeline(transformer=OracleTransformer(), scheduler=make_scheduler("ddim"))
    with pytest.raises(ValueError, match="class-conditional"):
        unconditional(batch_size=1, num_inference_steps=2, guidance_scale=4.0)


def test_pipeline_with_real_model_and_vae(tmp_path):
    from diffusers import AutoencoderKL

    from matten import create_model

    model = create_model("Matten-T/2", depth=2, hidden_size=32, num_heads=2, num_frames=2, sample_size=4,
                         num_classes=2, kernel_backend="ref").eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=8, scaling_factor=0.18215)
    pipe = MattenPipeline(transformer=model, scheduler=make_scheduler("ddpm"), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(5))
    b = pipe(batch_size=2, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(5))
    assert a.frames.dtype == np.uint8 and a.frames.shape == (2, 2, 8, 8, 3)  # latents 4x4 -> pixels 8x8
    np.testing.assert_array_equal(a.frames, b.frames)  # seeded
    pipe.save_pretrained(tmp_path / "pipe")
    again = MattenPipeline.from_pretrained(tmp_path / "pipe")
    assert type(again.transformer).__name__ == "MattenTransformer3DModel" and again.vae is not None
