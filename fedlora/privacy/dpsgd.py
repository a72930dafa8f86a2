"""Sample-level DP-SGD on the LoRA parameters with opacus (per-unit gradients, clipping,
Gaussian noise), inside fedlora's own training loop.

opacus's GradSampleModule computes per-example gradients of the trainable LoRA leaves (plain
nn.Linear, supported as is); its DPOptimizer clips each to `max_grad_norm`, sums, adds
N(0, (sigma * max_grad_norm)^2) and divides by the expected batch size. Batches are Poisson
samples (each unit independently with probability q), which is what the accountant assumes. We
call the optimiser's `pre_step` ourselves so that FedProx's proximal term and SCAFFOLD's
correction (functions of public values only) are added after the noise; and a Poisson batch can
be empty, where opacus has no per-example gradients: the step is then pure noise, written here
with the same formula, so that an empty batch is not revealed by a missing step.

The privacy unit is a row, or (privacy.unit) every row sharing a key such as a patient id: the
per-row gradients of a unit are summed into one per-unit gradient before opacus clips, so a
unit's whole contribution to a step is bounded by the clip however many rows it has. A logical
Poisson batch larger than `physical_batch_size` units goes through the model in pieces split by
opacus's BatchMemoryManager; the DPOptimizer accumulates the clipped pieces and noises once.
Both random parts come from the site's secret (fedlora.privacy.secrets): batch membership from
one stream and the Gaussian noise from another, drawn in numpy and moved to each parameter's
device. opacus's own noise takes a torch.Generator, whose seed is at most 64 bits (32 on the CPU),
so `secret_noise_optimizer` replaces its `add_noise`; opacus's Poisson sampler (DPDataLoader) would
draw batches from a torch generator too and is not used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from fedlora.privacy.secrets import DPSGD_BATCHES, DPSGD_NOISE, SiteSecret, gaussian_like

T = TypeVar("T")


class HasUnit(Protocol):
    unit: str


@dataclass(frozen=True)
class DPSGD:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # q: each unit joins a batch with this probability
    noise: np.random.Generator  # the site's secret noise stream for this round
    batches: np.random.Generator  # the site's secret batch-membership stream for this round
    physical_batch_size: int = 32  # units through the model at once (privacy.physical_batch_size)
    max_rows_per_unit: int = 32  # rows a unit trains on at most (privacy.max_rows_per_unit)

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
        physical_batch_size: int = 32,
        max_rows_per_unit: int = 32,
    ) -> DPSGD:
        """DP-SGD for one site and round, both streams keyed by the site's secret."""
        return cls(
            noise_multiplier,
            max_grad_norm,
            sample_rate,
            noise=secret.rng(DPSGD_NOISE, round_, site),
            batches=secret.rng(DPSGD_BATCHES, round_, site),
            physical_batch_size=physical_batch_size,
            max_rows_per_unit=max_rows_per_unit,
        )


def poisson_batch(rows: Sequence[T], sample_rate: float, rng: np.random.Generator) -> list[T]:
    return [rows[i] for i in np.flatnonzero(rng.random(len(rows)) < sample_rate)]


def privacy_units(rows: Sequence[HasUnit]) -> list[list[int]]:
    """Row indices grouped into privacy units, in order of first appearance: rows with the same
    non-empty `unit` form one unit, a row with unit "" is a unit of its own."""
    units: list[list[int]] = []
    where: dict[str, int] = {}
    for i, row in enumerate(rows):
        if not row.unit:
            units.append([i])
        elif row.unit in where:
            units[where[row.unit]].append(i)
        else:
            where[row.unit] = len(units)
            units.append([i])
    return units


def count_units(rows: Sequence[HasUnit]) -> int:
    """The number of privacy units: n in the sampling rate q = batch / n and in delta's default."""
    return len(privacy_units(rows))


def cap_units(units: list[list[int]], max_rows: int) -> tuple[list[list[int]], int]:
    """Each unit cut to its first `max_rows` rows; also the number of rows left out. The unit
    count, and so the accounting, is unchanged; the clip bounds a unit whatever its size."""
    capped = [u[:max_rows] for u in units]
    return capped, sum(len(u) for u in units) - sum(len(u) for u in capped)


class PoissonBatches:
    """`steps` logical batches of unit indices, each unit in a batch with probability q, drawn
    from `rng` (the same draws, in the same order, as `poisson_batch`). A batch sampler for a
    torch DataLoader, so that opacus's BatchMemoryManager can split its batches."""

    def __init__(self, n_units: int, sample_rate: float, steps: int, rng: np.random.Generator):
        self.n_units, self.sample_rate, self.steps, self.rng = n_units, sample_rate, steps, rng

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield [int(i) for i in poisson_batch(range(self.n_units), self.sample_rate, self.rng)]

    def __len__(self) -> int:
        return self.steps


def _as_list(batch: list[T]) -> list[T]:
    return batch


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
    """Per-unit clipping and noise for the parameters of one `local_train` call of `steps`
    logical steps over `rows`."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: DPSGD,
        rows: Sequence[T],
        steps: int,
    ) -> None:
        from opacus import GradSampleModule
        from opacus.utils.batch_memory_manager import BatchMemoryManager
        from torch.utils.data import DataLoader

        self.dp = dp
        units, dropped = cap_units(privacy_units(rows), dp.max_rows_per_unit)
        if dropped:
            warnings.warn(
                f"{dropped} rows of units with more than privacy.max_rows_per_unit = "
                f"{dp.max_rows_per_unit} rows are left out of training (each such unit trains "
                "on its first rows; its privacy is unaffected). Raise the cap if they fit.",
                stacklevel=2,
            )
        self.units = [[rows[i] for i in u] for u in units]
        self.rows_are_units = all(len(u) == 1 for u in self.units)
        self.expected_batch = dp.sample_rate * len(self.units)
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
        sampler = PoissonBatches(len(self.units), dp.sample_rate, steps, dp.batches)
        loader = DataLoader(self.units, batch_sampler=sampler, collate_fn=_as_list)
        with BatchMemoryManager(
            data_loader=loader,
            max_physical_batch_size=dp.physical_batch_size,
            optimizer=self.optimizer,
        ) as pieces:
            self._pieces = iter(pieces)
        self.physical_batches = 0  # forward/backward passes, for tests and timing

    def logical_step(self, loss_of: Callable[[list[T]], torch.Tensor]) -> float | None:
        """Set p.grad to one logical batch's clipped, noised mean gradient; return the mean
        loss of its rows (None for an empty batch, whose step is pure noise).

        `loss_of(rows)` is the mean of per-row losses (opacus's loss_reduction="mean")."""
        total, n_rows = 0.0, 0
        while True:
            # keeps the clipped sum of earlier pieces of this batch (opacus tracks which)
            self.optimizer.zero_grad(set_to_none=True)
            piece = next(self._pieces)
            if not piece:  # an empty Poisson batch: consume its end-of-batch signal, noise only
                self.optimizer._check_skip_next_step()
                self._noise_only()
                return None
            rows = [row for unit in piece for row in unit]
            loss = loss_of(rows)
            loss.backward()
            self.physical_batches += 1
            if not self.rows_are_units:
                self._sum_rows_into_units([len(unit) for unit in piece])
            total += float(loss.detach()) * len(rows)
            n_rows += len(rows)
            if self.optimizer.pre_step():  # False: clipped and summed, more pieces to come
                return total / n_rows

    def _sum_rows_into_units(self, sizes: list[int]) -> None:
        """Replace the per-row gradients by per-unit sums (rows of a unit are consecutive)."""
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        for p in self.optimizer.params:
            g = p.grad_sample
            owner_here = owner.to(g.device)
            p.grad_sample = g.new_zeros((len(sizes), *g.shape[1:])).index_add_(0, owner_here, g)

    def _noise_only(self) -> None:
        std = self.dp.noise_multiplier * self.dp.max_grad_norm
        for p in self.optimizer.params:
            p.grad = gaussian_like(p, std, self.dp.noise) / self.expected_batch

    def close(self) -> None:
        """Remove opacus's hooks and buffers: the model is reused for plain evaluation."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module._close()
