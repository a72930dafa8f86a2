"""Sample-level DP-SGD on the LoRA parameters with opacus (per-example gradients, clipping,
Gaussian noise), inside fedlora's own training loop.

opacus's GradSampleModule computes per-example gradients of the trainable LoRA leaves (plain
nn.Linear, supported as is); its DPOptimizer clips each to `max_grad_norm`, sums, adds
N(0, (sigma * max_grad_norm)^2) and divides by the expected batch size. Batches are Poisson
samples (each row independently with probability q), which is what the accountant assumes. We
call the optimiser's `pre_step` ourselves so that FedProx's proximal term and SCAFFOLD's
correction (functions of public values only) are added after the noise; and a Poisson batch can
be empty, where opacus has no per-example gradients: the step is then pure noise, written here
with the same formula, so that an empty batch is not revealed by a missing step.

Both random parts come from the site's secret (fedlora.privacy.secrets): batch membership from
one stream and the Gaussian noise from another, drawn in numpy and moved to each parameter's
device. opacus's own noise takes a torch.Generator, whose seed is at most 64 bits (32 on the CPU),
so `secret_noise_optimizer` replaces its `add_noise`; opacus's Poisson sampler (DPDataLoader) would
draw batches from a torch generator too and is not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fedlora.privacy.secrets import DPSGD_BATCHES, DPSGD_NOISE, SiteSecret, gaussian_like

T = TypeVar("T")


@dataclass(frozen=True)
class DPSGD:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # q: each row joins a batch with this probability
    noise: np.random.Generator  # the site's secret noise stream for this round
    batches: np.random.Generator  # the site's secret batch-membership stream for this round

    @classmethod
    def for_round(
        cls,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        *,
        secret: SiteSecret,
        round_: int,
        site: int,
    ) -> DPSGD:
        """DP-SGD for one site and round, both streams keyed by the site's secret."""
        return cls(
            noise_multiplier,
            max_grad_norm,
            sample_rate,
            noise=secret.rng(DPSGD_NOISE, round_, site),
            batches=secret.rng(DPSGD_BATCHES, round_, site),
        )


def poisson_batch(rows: Sequence[T], sample_rate: float, rng: np.random.Generator) -> list[T]:
    return [rows[i] for i in np.flatnonzero(rng.random(len(rows)) < sample_rate)]


def secret_noise_optimizer(optimizer: torch.optim.Optimizer, noise: np.random.Generator, **kw):
    """opacus's DPOptimizer around `optimizer`, its Gaussian noise drawn from the secret stream
    `noise` instead of a torch generator (opacus is imported only when DP-SGD runs)."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SecretNoiseOptimizer(DPOptimizer):
        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                p.grad = (p.summed_grad + gaussian_like(p.summed_grad, std, noise)).view_as(p)
                _mark_as_processed(p.summed_grad)

    return SecretNoiseOptimizer(optimizer, **kw)


class PrivateSteps:
    """Per-example clipping and noise for the parameters of one `local_train` call."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp: DPSGD, n_rows: int
    ) -> None:
        from opacus import GradSampleModule

        self.dp = dp
        self.expected_batch = dp.sample_rate * n_rows
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.optimizer = secret_noise_optimizer(
            optimizer,
            dp.noise,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(self.expected_batch)),
            loss_reduction="mean",
        )
        # opacus divides by an integer batch size; use the exact expected size instead
        self.optimizer.expected_batch_size = self.expected_batch

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def privatize(self, batch_was_empty: bool) -> None:
        """Replace p.grad by the clipped, noised mean gradient (noise only for an empty batch)."""
        if batch_was_empty:
            std = self.dp.noise_multiplier * self.dp.max_grad_norm
            for p in self.optimizer.params:
                p.grad = gaussian_like(p, std, self.dp.noise) / self.expected_batch
            return
        self.optimizer.pre_step()

    def close(self) -> None:
        """Remove opacus's hooks and buffers: the model is reused for plain evaluation."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()
