"""The trainer (SPEC §7): the loop that trains one supernet with a strategy.

Who does what in ``train/``: the strategy (:mod:`.strategies`) plans each step's members and their
roles (:mod:`.plan`); :mod:`.step` turns plan + batch into loss terms and gradients; :mod:`.loaders`
draws the epoch's batches and augmentation seeds; this module owns the network, optimizer, schedule,
selection index and checkpoints, and runs epochs of steps. What a finished run hands on is a
:class:`~.run_record.Run`.

Determinism and resume: everything random in epoch e (batch order, subnet sampling, dropout) is
seeded from (seed, e), and each image's augmentation from (seed, e, its position in the global batch)
— so augmentation does not depend on how the batch is sharded over processes. Checkpoints are
written atomically at the end of every epoch with the model, optimizer, schedule, step counter,
selection index and strategy state, so a run resumed from any checkpoint computes exactly what the
uninterrupted run computes (on the same device, thread count and number of processes).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import replace
from typing import Any

import torch
from tqdm import tqdm

from .. import spaces
from ..nn import Supernet
from ..nn.elastic_batchnorm import ElasticBatchNorm2d
from ..spaces import SearchSpace
from . import distributed as dist_utils
from .checkpoint import FORMAT, load_checkpoint, remove_stale_temporaries, save_atomic
from .config import TrainConfig
from .data import DataSplits, load_run_data, native_image_size
from .loaders import epoch_loaders, epoch_seed
from .plan import StepPlan
from .preemption import CheckpointClock, StopSignals, TrainingStopped
from .run_record import Run
from .selection import SelectionIndex
from .selection_sidecar import FILENAME as SIDECAR_FILENAME
from .selection_sidecar import write_sidecar
from .step import ComputeFormat, LossSettings, StepBatch, choose_step_backend, train_step
from .strategies import build_strategy


class Trainer:
    """Trains a supernet with ``config.strategy`` and writes its checkpoint (SPEC §10).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process builds a Trainer; they train the same
    subnets on their shards of each global batch and only rank 0 writes (see :mod:`.distributed`).
    """

    def __init__(self, config: TrainConfig, splits: DataSplits | None = None, resume: bool = False):
        self.checkpoint_path = os.path.join(config.out, "checkpoint.pt")
        self._flops_estimator = None  # Estimator for selection.json, built at the first checkpoint
        self.dist, self.device = dist_utils.context_from_env(config.device)
        saved = None
        if resume:
            saved = self._load_everywhere(self.checkpoint_path)
            # How members are computed (--step) is this run's choice: the modes compute the same step.
            config = TrainConfig.from_dict(
                {**saved["config"], "out": config.out, "device": config.device, "step": config.step}
            )
        chose_space = config.space is None and saved is None
        config = config.resolved()
        # Record the resolved numerics and layout, so that a resumed run computes as it did.
        self.compute_format = ComputeFormat.resolve(config.precision, config.channels_last, self.device)
        self.config = config = replace(
            config, precision=self.compute_format.precision, channels_last=self.compute_format.channels_last
        )
        dist_utils.check_divisible(config.batch_size, self.dist)
        # A resumed run rebuilds its space from the checkpoint: spaces derived by --init are no preset.
        self.space = SearchSpace.from_json(saved["space"]) if saved is not None else spaces.get(config.space)
        self.splits = splits or load_run_data(config, self.space)
        # The size images are stored at, recorded: a run reopened with a space derived by --init
        # must read its images as training did.
        self.config = config = replace(config, image_size=config.image_size or self.splits.size)
        if chose_space and self.dist.is_main:
            size = native_image_size(config.data, config.data_root)
            print(
                f"space {config.space!r} for {size} px images, stored at {self.splits.size} px "
                "(--space to choose another)",
                flush=True,
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the initial weights depend on the seed only
            self.net = self._build_network(resume=saved is not None).to(self.device)
        self.net.set_regularization(dropout=config.dropout, drop_connect=config.drop_connect)
        self.net = self.net.to(memory_format=self.compute_format.memory_format)
        self.step_backend = choose_step_backend(config.step, self.net, self.device)
        decay = [p for p in self.net.parameters() if p.ndim > 1]
        no_decay = [p for p in self.net.parameters() if p.ndim <= 1]  # biases and BN: no weight decay
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
        )
        self.steps_per_epoch = self._steps_per_epoch()
        self.strategy = build_strategy(config.strategy, self.space, config.epochs, self.steps_per_epoch, config)
        if (self.strategy.use_fm or self.strategy.use_kd) and self.splits.unlabelled is None:
            raise ValueError(f"loss {config.loss!r} needs unlabelled data; pass --labels-per-class or use --loss sup")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.strategy.lr_factor)
        self.loss_settings = LossSettings(config.label_smoothing, config.threshold)
        self.selection = SelectionIndex(self.space)
        self.epoch, self.step = 0, 0
        self._epoch_progress: dict[str, Any] | None = None
        self._timed = False  # whether this process has said how long training will take
        self._signals = StopSignals()
        self._clock = CheckpointClock(config.checkpoint_every, config.checkpoint_minutes)
        if saved is not None:
            self._restore(saved)

    def _load_everywhere(self, path: str) -> dict[str, Any]:
        """Rank 0 reads the checkpoint and hands it to the other ranks (errors reach every rank)."""
        state: Any = None
        if self.dist.is_main:
            try:
                state = load_checkpoint(path)
            except ValueError as exc:
                state = exc
        state = dist_utils.broadcast_object(state, self.dist)
        if isinstance(state, Exception):
            raise ValueError(str(state))
        return state

    # -- construction -------------------------------------------------------------------------

    def _build_network(self, resume: bool) -> Supernet:
        if self.config.init and not resume:  # on resume the checkpoint holds the weights
            from ..transfer import load_init

            # A derived space takes the resolutions the data calls for (small images stay small); for
            # ImageNet-size images the pretrained network's own range (128–224) beats tofa's 272–320.
            # OFA checkpoints come with their preset's resolutions.
            derived = not self.config.init.startswith("ofa:")
            resolutions = self.space.resolutions if derived and self.space.name != "tofa" else None
            net = load_init(self.config.init, self.splits.num_classes, resolutions=resolutions)
            self.space = net.space
            return net
        return Supernet(self.space, self.splits.num_classes)

    def _steps_per_epoch(self) -> int:
        """``config.epoch_unit``: ``labelled``, one pass over the labelled images (the supervised
        papers' epoch: RSS, OFA); ``unlabelled``, one pass over the unlabelled pool when there is
        one, whatever the loss, so that loss variants compared on the same data get the same number
        of steps (FixMatch), else over the labelled images."""
        c = self.config
        if c.epoch_unit == "unlabelled" and self.splits.unlabelled is not None:
            return max(1, len(self.splits.unlabelled) // (c.mu * c.batch_size))
        return max(1, len(self.splits.labelled) // c.batch_size)

    def _restore(self, saved: dict[str, Any]) -> None:
        self.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.selection = SelectionIndex(self.space, saved["selection_index"])
        self.epoch, self.step = int(saved["epoch"]), int(saved["step"])
        self.strategy.load_state_dict(saved.get("strategy", {}), self.net)
        self._epoch_progress = saved.get("epoch_progress")  # a checkpoint written mid-epoch
        if self._epoch_progress is not None and "rank_buffers" in self._epoch_progress:
            # Mid-epoch, each rank's BN running statistics are its own (averaged at epoch ends only).
            rank_buffers = self._epoch_progress["rank_buffers"]
            if len(rank_buffers) != self.dist.world_size:
                raise ValueError(
                    f"{self.checkpoint_path} was written mid-epoch by {len(rank_buffers)} processes; resume it "
                    f"with {len(rank_buffers)} processes (this run has {self.dist.world_size})"
                )
            buffers = dict(self.net.named_buffers())
            for name, value in rank_buffers[self.dist.rank].items():
                buffers[name].copy_(value)

    def state_dict(self, epoch_progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs. Mid-epoch, ``epoch_progress`` adds the epoch's RNG states
        and loss sums (see :meth:`train_epoch`); the data position follows from ``step``."""
        state = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "space": self.space.to_json(),
            "classes": list(self.splits.classes),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "selection_index": self.selection.state_dict(),
            "strategy": self.strategy.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
        }
        if epoch_progress is not None:
            state["epoch_progress"] = epoch_progress
        return state

    def run(self) -> Run:
        """The run as it stands: what ``select``, ``export``, the palette and search work on."""
        return Run(self.config, self.space, self.splits.classes, self.selection, net=self.net, splits=self.splits)

    # -- training -----------------------------------------------------------------------------

    def train_step(self, labelled, unlabelled, plan: StepPlan) -> dict[str, torch.Tensor]:
        """One optimizer step on ``plan``'s members; returns the loss terms summed over members
        (0-dim tensors on the device, ``lr`` included), read back by the caller when it logs."""
        self.optimizer.zero_grad(set_to_none=True)
        batch = StepBatch.to_device(
            labelled, unlabelled if plan.uses_unlabelled else None, self.device, self.compute_format
        )
        terms = train_step(
            self.net,
            plan,
            batch,
            self.loss_settings,
            self.compute_format,
            self.step_backend,
            teacher=self.strategy.teacher(),
        )
        dist_utils.average_gradients(list(self.net.parameters()), self.dist)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.selection.update(plan.indexed_archs, self.step)
        return terms

    def _train_mode(self) -> None:
        self.net.train()
        if self.config.freeze_bn:  # running statistics normalise and stay fixed; affine still trains
            for m in self.net.modules():
                if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, ElasticBatchNorm2d)):
                    m.eval()

    def train_epoch(self) -> dict[str, float]:
        """Train (the rest of) one epoch; returns its mean loss terms (averaged over processes) and
        the last lr. Writes mid-epoch checkpoints when due; on a stop signal writes one and raises
        :class:`TrainingStopped` at the step boundary.

        Resuming mid-epoch: the epoch restarts from its seed (its batch lists, the strategy's epoch
        draw), then the RNG states saved with the checkpoint replace the fresh ones and the batches
        already trained are skipped — the rest of the epoch is what the uninterrupted run trains."""
        c, epoch, spe = self.config, self.epoch, self.steps_per_epoch
        seed = epoch_seed(c.seed, epoch)
        torch.manual_seed(seed)  # dropout and drop-connect of this epoch
        rng = random.Random(seed)  # subnet sampling: identical on every rank
        progress, self._epoch_progress = self._epoch_progress, None
        self.strategy.on_epoch_start(epoch, rng, self.net, self.optimizer, resumed=progress is not None)
        done = self.step - epoch * spe  # steps of this epoch in the checkpoint
        self._train_mode()
        uses_unlabelled = self.strategy.use_fm or self.strategy.use_kd
        lab_loader, unl_loader = epoch_loaders(
            self.splits,
            seed,
            spe,
            c.batch_size,
            c.mu,
            uses_unlabelled,
            self.dist,
            c.num_workers,
            skip=done,
            normalization=(self.space.input_mean, self.space.input_std),
        )
        bar = tqdm(
            zip(lab_loader, unl_loader),  # zip creates both loaders' iterators now
            initial=done,
            total=spe,
            desc=f"epoch {epoch + 1}/{c.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not self.dist.is_main,
        )
        totals: dict[str, torch.Tensor] = {}
        if progress is not None:  # after the loaders' iterators exist: creating one draws a seed
            rng.setstate(_as_rng_state(progress["rng"]))
            torch.set_rng_state(progress["torch_rng"])
            if self.device.type == "cuda" and "cuda_rng" in progress:
                torch.cuda.set_rng_state(progress["cuda_rng"], self.device)
            totals = {k: torch.tensor(v, device=self.device) for k, v in progress["totals"].items()}
        started = time.perf_counter()
        for i, (labelled, unlabelled) in enumerate(bar, done + 1):
            for k, v in self.train_step(labelled, unlabelled, self.strategy.plan(rng)).items():
                totals[k] = totals[k] + v if k in totals else v
            if not self._timed and (i - done == 5 or i == spe):
                self._report_pace((time.perf_counter() - started) / (i - done))
            if i % c.log_every == 0 and self.dist.is_main:  # one device → host transfer per interval
                bar.set_postfix({k: f"{v:.3f}" for k, v in _to_host(totals, 1 / i).items()})
            # Ranks agree on time- and signal-driven decisions at every step of a single process and
            # at every logging interval under torchrun (a collective each step would cost a sync).
            time_due, stop = False, None
            if not self.dist.enabled or i % c.log_every == 0 or i == spe:
                time_due, stop = self._clock.agree(self._signals.requested, self.dist)
            if i < spe and (stop or time_due or self._clock.steps_due(self.step)):
                self.save(self._progress(rng, totals))
            if stop:
                self._stop_signal = stop
                if i < spe:
                    raise TrainingStopped(stop, self.checkpoint_path, self.epoch, self.step)
                break
        self.epoch += 1
        dist_utils.average_buffers(self.net, self.dist)  # BN running statistics agree on all ranks
        means = dist_utils.average_scalars(_to_host(totals, 1 / spe), self.dist)
        return {**means, "lr": self.scheduler.get_last_lr()[0]}

    def _report_pace(self, seconds_per_step: float) -> None:
        """Say, once, how long an epoch and the rest of the run take at the measured pace, and
        which flags would shorten a run that takes hours on a CPU."""
        self._timed = True
        if not self.dist.is_main:
            return
        left = (self.config.epochs * self.steps_per_epoch - self.step) * seconds_per_step
        message = (
            f"{seconds_per_step:.2f} s/step: about {_duration(seconds_per_step * self.steps_per_epoch)} per epoch, "
            f"{_duration(left)} for the rest of the run"
        )
        if left > 3600 and self.device.type == "cpu":
            message += (
                f"; to shorten it: a smaller --space (now {self.config.space!r}; 'digits' or 'rss' for small "
                "images), fewer --epochs, or a GPU (--device cuda)"
            )
        tqdm.write(message)

    def _progress(self, rng: random.Random, totals: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What a mid-epoch checkpoint adds: the RNG states after the last step, and loss sums."""
        progress = {
            "rng": list(rng.getstate()),
            "torch_rng": torch.get_rng_state(),
            "totals": _to_host(totals, 1.0),
        }
        if self.device.type == "cuda":
            progress["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.dist.enabled:  # BN running statistics differ over ranks until the epoch's end
            own = {name: b.detach().cpu() for name, b in self.net.named_buffers() if b.is_floating_point()}
            progress["rank_buffers"] = dist_utils.all_gather_objects(own, self.dist)
        return progress

    def save(self, epoch_progress: dict[str, Any] | None = None) -> None:
        """Write the checkpoint atomically (rank 0; the others wait for it). A failed write leaves
        the previous checkpoint as it was and raises ``OSError`` saying so, on every rank."""
        error = None
        if self.dist.is_main:
            try:
                save_atomic(self.state_dict(epoch_progress), self.checkpoint_path)
            except OSError as exc:
                error = (
                    f"could not write checkpoint {self.checkpoint_path} at step {self.step}: "
                    f"{exc.strerror or exc}; the previous checkpoint, if any, is intact"
                )
            else:
                self._write_selection_sidecar()
        error = dist_utils.broadcast_object(error, self.dist)  # also the barrier
        if error is not None:
            raise OSError(error)
        self._clock.reset()

    def _write_selection_sidecar(self) -> None:
        """``selection.json`` beside the checkpoint just written (selection_sidecar.py): ``tofa-fast
        select`` answers from it without torch. A failed write only costs ``select`` its fast path."""
        if self._flops_estimator is None:  # built once per trainer, not once per checkpoint
            from ..estimator import Estimator

            self._flops_estimator = Estimator(self.space, num_classes=self.splits.num_classes)
        try:
            write_sidecar(
                self.checkpoint_path,
                self.space,
                self.selection,
                self._flops_estimator.flops,
                self.strategy.sandwich_selection,
                params=self._flops_estimator.params,
            )
        except OSError as exc:
            print(
                f"note: could not write {SIDECAR_FILENAME} ({exc.strerror or exc}); select reads the checkpoint instead"
            )

    def fit(self, max_epochs: int | None = None) -> None:
        """Train up to ``config.epochs`` (or ``max_epochs`` more), checkpointing after each epoch
        (and mid-epoch when the config asks) and logging per-term losses to ``train_log.jsonl``.
        SIGTERM / SIGINT stop it cleanly at the next step boundary (:class:`TrainingStopped`)."""
        if self.dist.is_main:
            os.makedirs(self.config.out, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_path)  # left by a process killed mid-write
        target = self.config.epochs if max_epochs is None else min(self.config.epochs, self.epoch + max_epochs)
        log_path = os.path.join(self.config.out, "train_log.jsonl")
        self._stop_signal = None
        self._clock.reset()
        with self._signals:
            while self.epoch < target:
                start = time.perf_counter()
                terms = self.train_epoch()
                self.save()
                if self.dist.is_main:
                    record = {
                        "epoch": self.epoch,
                        "step": self.step,
                        "seconds": round(time.perf_counter() - start, 2),
                        **terms,
                    }
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
                    print(line, flush=True)
                if self._stop_signal is not None:
                    raise TrainingStopped(self._stop_signal, self.checkpoint_path, self.epoch - 1, self.step)


def _to_host(terms: dict[str, torch.Tensor], scale: float) -> dict[str, float]:
    """The terms times ``scale`` as Python floats, in one device → host transfer."""
    if not terms:
        return {}
    values = (torch.stack([v.float() for v in terms.values()]) * scale).tolist()
    return dict(zip(terms, values))


def _as_rng_state(state: list) -> tuple:
    """``random.Random.getstate()`` from its checkpoint form (tuples are stored as lists)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
