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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DPSGD:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # q: each row joins a batch with this probability
    noise_seed: int  # the site's secret noise stream for this round


def poisson_batch(rows: Sequence[T], sample_rate: float, rng: np.random.Generator) -> list[T]:
    return [rows[i] for i in np.flatnonzero(rng.random(len(rows)) < sample_rate)]


class PrivateSteps:
    """Per-example clipping and noise for the parameters of one `local_train` call."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp: DPSGD, n_rows: int
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.dp = dp
        self.expected_batch = dp.sample_rate * n_rows
        # the noise is drawn where the gradients live (opacus draws on each parameter's device)
        device = next(p for group in optimizer.param_groups for p in group["params"]).device
        self.generator = torch.Generator(device=device).manual_seed(dp.noise_seed)
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(self.expected_batch)),
            loss_reduction="mean",
            generator=self.generator,
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
                noise = torch.normal(
                    0.0, std, p.shape, generator=self.generator, device=p.device, dtype=p.dtype
                )
                p.grad = noise / self.expected_batch
            return
        self.optimizer.pre_step()

    def close(self) -> None:
        """Remove opacus's hooks and buffers: the model is reused for plain evaluation."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()
