"""Exact mid-epoch resume: a run resumed from a checkpoint written in the middle of an epoch goes on with the
next sample of that epoch not yet seen, each sample once, on the same or on another number of ranks.

Lightning restores its loops' counters but not where a plain ``DataLoader`` was: the epoch's data starts again
from its beginning, and Lightning only warns that the results are unreliable. It re-creates the loader's
``DistributedSampler`` on resume, though, and that sampler draws the epoch's order from its seed and the epoch
number alone. So the order can be drawn again, and the samples a run consumed are a prefix of it: rank ``r``
of ``R`` takes positions ``r, r + R, ...`` of the (padded) order, so after ``k`` batches of ``B`` the ranks
together have taken positions ``[0, k·B·R)``. A checkpoint written mid-epoch records that count
(:func:`records_at_save`); the resumed run's sampler (:class:`ResumableDistributedSampler`, which Lightning
is made to create in place of its ``DistributedSampler`` for training) deals out the rest of the order over
the ranks it has now, and the epoch loop's batch counters are moved to match what is left (:func:`install`).

torchdata's ``StatefulDistributedSampler`` keeps a per-rank count, which cannot be carried to another number
of ranks; Lightning's own path for exact resume is a dataloader with ``state_dict``, which few users have. This
serves the ones Lightning gives a ``DistributedSampler``: a loader with a plain random or sequential sampler.
A loader with its own sampler, several training loaders, or an iterable dataset keeps Lightning's behaviour.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """torch's ``DistributedSampler``, which can start one epoch after the samples an earlier run took from it.

    Until :meth:`resume` is called it yields exactly what ``DistributedSampler`` yields.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_epoch: int | None = None
        self._consumed = 0
        self._generator_state: torch.Tensor | None = None

    def resume(self, epoch: int, consumed: int) -> None:
        """In epoch ``epoch``, leave out the first ``consumed`` samples of the epoch's order (all ranks').

        Also keeps torch's generator state as it is now (as the checkpoint restored it), and puts it back when
        the loader takes its first index: a ``DataLoader``'s iterator draws its workers' seed from that generator
        when it is created. A run never interrupted drew it at the epoch's start, before the checkpoint; the
        resumed run draws it again after, which would shift every random draw of the training that follows
        (dropout masks, say) away from the uninterrupted run's.
        """
        self._resume_epoch, self._consumed = epoch, consumed
        self._generator_state = torch.get_rng_state()

    def samples_left(self) -> int:
        """How many samples this rank yields in the current epoch."""
        if not self._resuming():
            return self.num_samples
        left = len(self.dataset) - self._consumed  # type: ignore[arg-type]
        return left // self.num_replicas if self.drop_last else math.ceil(left / self.num_replicas)

    def _resuming(self) -> bool:
        return self._resume_epoch == self.epoch and self._consumed > 0

    def __iter__(self) -> Iterator[Any]:
        if not self._resuming():
            return super().__iter__()
        # The order DistributedSampler draws for this epoch (torch 2.13), before its padding.
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(size, generator=generator).tolist()
        else:
            order = list(range(size))
        rest = order[self._consumed :]
        total = self.samples_left() * self.num_replicas
        if total > len(rest):  # padded as DistributedSampler pads: repeating from the start
            rest += (rest * math.ceil(total / len(rest)))[: total - len(rest)]
        return self._yield(rest[self.rank : total : self.num_replicas])

    def _yield(self, indices: list[int]) -> Iterator[int]:
        for index in indices:
            if self._generator_state is not None:
                torch.set_rng_state(self._generator_state)
                self._generator_state = None
            yield index


def records_at_save(trainer: Any, configured: int | None = None) -> dict[str, dict[str, int] | None]:
    """What a checkpoint keeps of the training data: ``"data"``, where the epoch's order is when it is written
    in the middle of an epoch (else ``None``), and ``"batch"``, the global batch it was trained with, beside the
    accumulation the Trainer was ``configured`` with where a resume changed it (:func:`keep_global_batch`), so
    that the next resume tells parti's change from the user's."""
    loader = _training_loader(trainer)
    if loader is None or loader.batch_size is None:
        return {"data": None, "batch": None}
    sampler: DistributedSampler = loader.sampler  # type: ignore[assignment]
    size = len(sampler.dataset)  # type: ignore[arg-type]
    batch = {"data_parallel": sampler.num_replicas, "batch_size": loader.batch_size,
             "accumulate": trainer.accumulate_grad_batches,
             "configured": configured or trainer.accumulate_grad_batches}
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if not 0 < done < trainer.num_training_batches:
        return {"data": None, "batch": batch}  # at an epoch's start or end, Lightning itself resumes exactly
    consumed = min(done * loader.batch_size * sampler.num_replicas, size)
    return {"data": {"epoch": trainer.current_epoch, "consumed": consumed, "dataset": size}, "batch": batch}


def keep_global_batch(trainer: Any, saved: dict[str, int] | None, data_parallel: int) -> int | None:
    """Resumed on another number of data-parallel ranks: accumulate gradients over as many more (or fewer) batches
    as keep the global batch the checkpoint trained with, where the numbers divide; else say what changes.

    Each optimizer step then averages the gradients of the same samples as before the change (the resumed
    sampler deals the epoch's order out in the same sequence), so training goes on as the run would have. The
    checkpoint's own accumulation may be parti's (a run resumed on fewer ranks before): the one the Trainer was
    configured with is recorded beside it, and a run configured otherwise keeps its own.

    Returns:
        the accumulation the Trainer was configured with, for the checkpoints this run writes; ``None`` where
        the checkpoint recorded none or the run chose its own.
    """
    # Checkpoints of the release before record no configured accumulation: theirs was the Trainer's.
    configured = saved.get("configured", saved["accumulate"]) if saved else None
    if not saved or trainer.accumulate_grad_batches != configured:
        return None  # nothing recorded, or the user chose another accumulation for this run
    before = saved["data_parallel"] * saved["accumulate"]
    if before % data_parallel == 0:
        if saved["data_parallel"] == data_parallel and before // data_parallel == trainer.accumulate_grad_batches:
            return configured  # the checkpoint's ranks, at the accumulation it was configured with
        trainer.accumulate_grad_batches = before // data_parallel
        rank_zero_info(
            f"parti: resumed on {data_parallel} data-parallel rank(s), written on {saved['data_parallel']}: gradients"
            f" accumulate over {trainer.accumulate_grad_batches} batch(es) (was {saved['accumulate']}), keeping the"
            f" global batch of {before * saved['batch_size']} samples (with the same batch per rank)."
        )
    else:
        rank_zero_info(
            f"parti: resumed on {data_parallel} data-parallel rank(s), written on {saved['data_parallel']}: no"
            f" whole accumulation keeps the global batch of {before * saved['batch_size']} samples; it is now"
            f" {data_parallel * saved['accumulate'] * saved['batch_size']} (with the same batch per rank)."
        )
    return configured


def _training_loader(trainer: Any) -> DataLoader | None:
    combined = trainer.fit_loop._combined_loader
    loaders = combined.flattened if combined is not None else []
    if len(loaders) != 1 or not isinstance(loaders[0], DataLoader):
        return None
    loader = loaders[0]
    return loader if isinstance(loader.sampler, ResumableDistributedSampler) else None


def _resume(trainer: Any, sampler: ResumableDistributedSampler, batch_size: int | None, drop_last: bool) -> None:
    """Start ``sampler`` where the checkpoint's epoch was, and move the epoch loop's counters to match."""
    position = getattr(trainer.strategy, "data_position", None)
    if not position or batch_size is None or position["epoch"] != trainer.current_epoch:
        return
    if position["dataset"] != len(sampler.dataset):  # type: ignore[arg-type]
        rank_zero_info("parti: the training set's size changed since the checkpoint: its epoch starts again.")
        return
    sampler.set_epoch(position["epoch"])
    sampler.resume(position["epoch"], position["consumed"])
    batches_left = _batches(sampler.samples_left(), batch_size, drop_last)
    total = _batches(sampler.num_samples, batch_size, drop_last)
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    # The loop counts the epoch's batches on this world size: it ends the epoch when the counter reaches the
    # loader's length, and so must reach it exactly when the rest of the order runs out.
    shift = (total - batches_left) - progress.processed
    progress.ready += shift
    progress.started += shift
    progress.processed += shift
    progress.completed += shift
    rank_zero_info(f"parti: the resumed epoch {position['epoch']} goes on after its first {position['consumed']}"
                   f" samples: {batches_left} batch(es) of it left on each rank.")
    # Lightning then warns that a loader without state makes a mid-epoch resume unreliable: not this one.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended",
                            category=PossibleUserWarning)
    trainer.strategy.data_position = None


def _batches(samples: int, batch_size: int, drop_last: bool) -> int:
    """The batches a loader makes of ``samples`` (as ``len(DataLoader)`` counts them)."""
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


def install() -> None:
    """Have Lightning create a :class:`ResumableDistributedSampler` for training where it creates a
    ``DistributedSampler``, and start it where a mid-epoch checkpoint left off. Once; idempotent."""
    resolve = _DataConnector._resolve_sampler
    if getattr(resolve, "_parti_wrapped", False):
        return

    @functools.wraps(resolve)
    def resolve_sampler(self: _DataConnector, dataloader: DataLoader, shuffle: bool,
                        mode: RunningStage | None = None) -> Any:
        sampler = resolve(self, dataloader, shuffle, mode)
        if mode != RunningStage.TRAINING or type(sampler) is not DistributedSampler:
            return sampler
        resumable = ResumableDistributedSampler(
            sampler.dataset, num_replicas=sampler.num_replicas, rank=sampler.rank, shuffle=sampler.shuffle,
            seed=sampler.seed, drop_last=sampler.drop_last,
        )
        _resume(self.trainer, resumable, dataloader.batch_size, dataloader.drop_last)
        return resumable

    resolve_sampler._parti_wrapped = True  # type: ignore[attr-defined]
    _DataConnector._resolve_sampler = resolve_sampler  # type: ignore[method-assign]
