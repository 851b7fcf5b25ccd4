"""Exact resume: a run killed at any step and resumed from its last checkpoint ends bit-identical to an
uninterrupted run (on CPU).

Three things make it exact:
- `EpochSampler` orders an epoch from (seed, epoch) only, gives each rank every W-th index
  (DistributedSampler's split, so Lightning keeps it under DDP) and hands each sample a draw seed made
  from (seed, epoch, index): caption choice, task order, guidance drop and augmentation no longer
  depend on the global RNG, so they repeat after a restart.
- `ResumableLoader` is a DataLoader that Lightning checkpoints (it has `state_dict`): the epoch and how
  many batches of it were trained, read from the trainer's progress when the checkpoint is written;
  on resume it skips those batches instead of replaying the epoch.
- `ResumableModule` stores the torch / numpy / Python RNG states in every checkpoint (every rank's under DDP)
  and puts them back just before the first resumed training batch (dropout, codebook restarts, noise draws
  continue).

`LastCheckpoint` keeps `last.ckpt` current: at the end of training, and at the end of the current batch
when SIGTERM or SIGINT arrives (then the run stops cleanly), so `--ckpt_path last` continues it.
"""
from __future__ import annotations

import io
import random
import signal
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from torch.utils.data import DataLoader, DistributedSampler

from common.io import atomic_write


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the random draws of sample `index` in `epoch` (splitmix64-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % 2**64
    return (x ^ (x >> 32)) % 2**63


def visit(item: int | tuple[int, int]) -> tuple[int, int | None]:
    """(index, draw seed) of a dataset item: EpochSampler passes both, evaluation loaders a bare index."""
    return (item, None) if isinstance(item, int) else (int(item[0]), int(item[1]))


def visit_rng(item: int | tuple[int, int], fixed_seed: int | None = None) -> tuple[int, random.Random]:
    """(index, RNG for this visit's random draws): from the sampler's draw seed in training, from a seed fixed
    per index otherwise (validation: the same draws every epoch)."""
    i, seed = visit(item)
    if seed is None:
        seed = (fixed_seed or 0) * 1_000_003 + i
    return i, random.Random(seed)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """Yields (index, draw_seed) pairs: a shuffled order fixed by (seed, epoch), split across ranks."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        world, rank = _world()
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self._skip: tuple[int, int] | None = None  # (epoch, samples of this rank to skip)

    def skip(self, epoch: int, samples: int) -> None:
        """Start `epoch` after its first `samples` (this rank's share): resume mid-epoch."""
        self._skip = (epoch, samples)

    def __iter__(self):
        epoch = self.epoch  # fixed when the iteration starts: a later set_epoch is for the next one
        order = list(super().__iter__())  # this rank's indices for this epoch
        start = 0
        if self._skip is not None and self._skip[0] == epoch:
            start = self._skip[1]
        self._skip = None
        for i in order[start:]:
            yield i, draw_seed(self.seed, epoch, i)


class ResumableLoader(DataLoader):
    """A DataLoader over an EpochSampler whose position Lightning saves in checkpoints.

    `progress()` returns (epoch, batches trained in it); the data module passes one that reads the
    trainer. The iteration RNG is private (`generator`), so building an iterator never moves the global one.
    """

    def __init__(self, dataset, batch_size: int, sampler: EpochSampler, progress: Callable[[], tuple[int, int]],
                 **kwargs):
        super().__init__(dataset, batch_size, sampler=sampler, drop_last=True, generator=torch.Generator(), **kwargs)
        self.progress = progress

    def state_dict(self) -> dict:
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch_size") != self.batch_size:
            raise ValueError(f"cannot resume mid-epoch: the checkpoint was trained with batch_size "
                             f"{state.get('batch_size')}, this run uses {self.batch_size}")
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # written at the last batch of an epoch: the run goes on with the next epoch
            epoch, batches = epoch + 1, 0
        # Lightning builds the iterator before it sets the sampler's epoch on a resumed run: set it here
        self.sampler.set_epoch(epoch)
        self.sampler.skip(epoch, batches * self.batch_size)


def trainer_progress(module: L.LightningDataModule) -> Callable[[], tuple[int, int]]:
    """(epoch, batches processed in it) of the data module's trainer, for ResumableLoader."""

    def progress() -> tuple[int, int]:
        t = module.trainer
        if t is None:
            return 0, 0
        return t.current_epoch, t.fit_loop.epoch_loop.batch_progress.current.processed

    return progress


def resumable_loader(module: L.LightningDataModule, dataset, **kwargs) -> ResumableLoader:
    """The training loader of a data module with `batch_size` and `seed`: exact resume, DDP split."""
    return ResumableLoader(dataset, module.batch_size, EpochSampler(len(dataset), module.seed),
                           trainer_progress(module), **kwargs)


def rng_state() -> dict:
    """Every global RNG state, in types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def restore_loader_position(trainer) -> None:
    """Put the training loader where the checkpoint left it, when Lightning did not (called at train start).

    Lightning hands a checkpoint's loader state to the loader only when it builds the training loader after
    restoring the checkpoint. A module whose `configure_optimizers` asks for `trainer.estimated_stepping_batches`
    (the cosine schedules here, with `max_epochs` set: every epoch-based recipe) makes Lightning build the loader
    and its first iterator earlier, before the restore; the state then stays unused and the resumed run replays
    the epoch from its first batch. Here the state is loaded and the iterator built again."""
    loop = trainer.fit_loop
    states = getattr(loop, "_combined_loader_states_to_load", None)
    if not states or loop._combined_loader is None or loop._data_fetcher is None:
        return
    loop._combined_loader._load_state_dicts(states)
    loop._combined_loader_states_to_load = []
    iter(loop._data_fetcher)  # a fresh iterator (and prefetched first batch) from the restored position


class ResumableModule(L.LightningModule):
    """Base of our training modules: RNG states saved with each checkpoint and restored on resume; the
    training loader's position restored (restore_loader_position); validation runs on a copy of the RNG
    streams, so whether and when it runs (sanity check, a validation skipped or redone after a resume,
    sample drawing in SampleLogger) never changes what training draws."""

    _pending_rng: dict | None = None
    _rng_before_validation: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng"] = rng_state()
        world, _ = _world()
        if world > 1:  # every rank builds the checkpoint (only rank 0 writes it): keep each rank's streams
            states = [None] * world
            dist.all_gather_object(states, checkpoint["rng"])
            checkpoint["rng_per_rank"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        world, rank = _world()
        per_rank = checkpoint.get("rng_per_rank")
        # the same number of processes continues each rank's own streams; another count falls back to rank 0's
        self._pending_rng = per_rank[rank] if per_rank and len(per_rank) == world else checkpoint.get("rng")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:  # the first batch after a resume: continue the saved streams
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_start(self) -> None:
        restore_loader_position(self.trainer)

    def on_validation_start(self) -> None:
        self._rng_before_validation = rng_state()

    def on_validation_end(self) -> None:
        if self._rng_before_validation is not None:
            set_rng_state(self._rng_before_validation)
            self._rng_before_validation = None


class LastCheckpoint(L.Callback):
    """Keeps `last.ckpt` current: written when training ends, and when SIGTERM / SIGINT arrives (at the end
    of the current batch, after which the run stops cleanly), so `--ckpt_path last` continues any run.

    The file goes where the run's ModelCheckpoint keeps `last.ckpt`, or to `<default_root_dir>/checkpoints/`.
    Under DDP the ranks agree at each batch end whether any of them got the signal, so all stop together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}
        self._saved_step = -1

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        try:
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): leave the handlers alone
            self._previous = {}

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _save(self, trainer) -> Path:
        path = self.last_path(trainer)
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(path)
            self._saved_step = trainer.global_step
        return path

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()  # nothing is saved: the state after a failure is not a good one

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self._save(trainer)
        if trainer.is_global_zero:
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            print(f"received {name}: saved {path} at step {trainer.global_step}; resume with --ckpt_path last",
                  flush=True)
        trainer.should_stop = True

    @staticmethod
    def last_path(trainer) -> Path:
        cb = trainer.checkpoint_callback
        folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        return folder / "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a kill at any moment cannot spoil: the checkpoint is serialised in memory, written
    to a temp file beside the target, fsynced and renamed onto it (common.io.atomic_write). Lightning's own
    write stages the file in the system temp folder and moves it, which is a copy onto the target (truncated by
    a kill half way) when that folder is on another file system. Remote paths (`s3://...`) keep Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
