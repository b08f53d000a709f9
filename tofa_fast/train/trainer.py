"""The trainer (SPEC §7): one supernet, trained by a strategy (``tofa``, ``rss``, ``ps``, ``single``).

:mod:`.strategies` decides which subnets each step trains; this module runs the steps: data,
augmentation, the loss terms, the optimizer, checkpoints, and the multi-process split
(:mod:`.distributed`).

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
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import spaces
from ..nn import Supernet
from ..nn.elastic_batchnorm import ElasticBatchNorm2d
from ..spaces import Arch, SearchSpace
from . import distributed as dist_utils
from . import losses
from .augment import eval_transform, strong_transform, weak_transform
from .checkpoint import FORMAT, load_checkpoint, save_atomic
from .config import TrainConfig
from .data import DataSplits, ImageSet, load_data
from .selection import SelectionIndex
from .strategies import build_strategy


def _seeded(transform, img: torch.Tensor, seed: int) -> torch.Tensor:
    """``transform(img)`` with torch's CPU generator seeded by ``seed``, its state restored after.

    Reseeds ``torch.default_generator`` directly: ``torch.manual_seed`` also seeds every other device
    generator and costs 50× more, which is measurable once per image."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(img)
    finally:
        generator.set_state(state)


class _Labelled(Dataset):
    """Keys are (index, augmentation seed) pairs."""

    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        i, seed = key
        img, label = self.images[i]
        return _seeded(self.transform, img, seed), label


class _Unlabelled(Dataset):
    def __init__(self, images: ImageSet, weak, strong):
        self.images, self.weak, self.strong = images, weak, strong

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        i, seed = key
        img = self.images.image(i)
        return _seeded(self.weak, img, seed), _seeded(self.strong, img, seed + 1)


class _Plain(Dataset):
    def __init__(self, images: ImageSet, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        item = self.images[i]
        if isinstance(item, tuple):
            return self.transform(item[0]), item[1]
        return self.transform(item), -1


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator, stream: int) -> list[list[tuple]]:
    """``steps`` global batches of (index, augmentation seed), indices drawn as concatenated random
    permutations of range(n). The seed of an image depends on its position in the epoch's sequence
    of global batches, not on which process handles it."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=generator).tolist()
    base = int(torch.randint(0, 2**62, (1,), generator=generator)) + stream
    keyed = [(index, (base + 2 * position) % 2**63) for position, index in enumerate(order[: steps * batch_size])]
    return [keyed[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


class Trainer:
    """Trains a supernet with ``config.strategy`` and writes its run folder (SPEC §10).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process builds a Trainer; they train the same
    subnets on their shards of each global batch and only rank 0 writes (see :mod:`.distributed`).
    """

    def __init__(self, config: TrainConfig, splits: DataSplits | None = None, resume: bool = False):
        self.checkpoint_path = os.path.join(config.out, "checkpoint.pt")
        self.dist, self.device = dist_utils.context_from_env(config.device)
        saved = None
        if resume:
            saved = self._load_everywhere(self.checkpoint_path)
            config = TrainConfig.from_dict({**saved["config"], "out": config.out, "device": config.device})
        self.config = config = config.resolved()
        dist_utils.check_divisible(config.batch_size, self.dist)
        # A resumed run rebuilds its space from the checkpoint: spaces derived by --init are no preset.
        self.space = SearchSpace.from_json(saved["space"]) if saved is not None else spaces.get(config.space)
        size = config.image_size or max(self.space.resolutions)
        self.splits = splits or load_data(
            config.data,
            size,
            config.labels_per_class,
            config.seed,
            config.data_root,
            config.download,
            config.val_per_class,
        )
        self.use_fm, self.use_kd = losses.variant_terms(config.loss)
        if (self.use_fm or self.use_kd) and self.splits.unlabelled is None:
            raise ValueError(f"loss {config.loss!r} needs unlabelled data; pass --labels-per-class or use --loss sup")

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the initial weights depend on the seed only
            self.net = self._build_network(resume=saved is not None).to(self.device)
        self.net.set_regularization(dropout=config.dropout, drop_connect=config.drop_connect)
        if self.device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.strategy.lr_factor)
        self.selection = SelectionIndex(self.space)
        self.epoch, self.step = 0, 0
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

            net = load_init(self.config.init, self.splits.num_classes)
            self.space = net.space
            return net
        return Supernet(self.space, self.splits.num_classes)

    def _steps_per_epoch(self) -> int:
        """One epoch is a pass over the unlabelled pool when there is one, whatever the loss, so
        that loss variants compared on the same data get the same number of steps (FixMatch)."""
        c = self.config
        if self.splits.unlabelled is not None:
            return max(1, len(self.splits.unlabelled) // (c.mu * c.batch_size))
        return max(1, len(self.splits.labelled) // c.batch_size)

    def _restore(self, saved: dict[str, Any]) -> None:
        self.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.selection = SelectionIndex(self.space, saved["selection_index"])
        self.epoch, self.step = int(saved["epoch"]), int(saved["step"])
        self.strategy.load_state_dict(saved.get("strategy", {}), self)

    def state_dict(self) -> dict[str, Any]:
        return {
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

    # -- training -----------------------------------------------------------------------------

    def _loaders(self, epoch: int):
        """This rank's labelled and unlabelled loaders for ``epoch`` (its shard of every global batch)."""
        c, s = self.config, self.splits
        g = torch.Generator().manual_seed(_epoch_seed(c.seed, epoch))
        weak = weak_transform(s.size, s.flip)
        lab = _Labelled(s.labelled, weak)
        lab_batches = _batches(len(lab), c.batch_size, self.steps_per_epoch, g, stream=0)
        kw = dict(num_workers=c.num_workers, persistent_workers=False)
        lab_loader = DataLoader(lab, batch_sampler=[dist_utils.shard(b, self.dist) for b in lab_batches], **kw)
        if not (self.use_fm or self.use_kd):
            return lab_loader, [None] * self.steps_per_epoch
        unl = _Unlabelled(s.unlabelled, weak, strong_transform(s.size, s.flip))
        unl_batches = _batches(len(unl), c.mu * c.batch_size, self.steps_per_epoch, g, stream=1)
        return lab_loader, DataLoader(unl, batch_sampler=[dist_utils.shard(b, self.dist) for b in unl_batches], **kw)

    def train_step(self, labelled, unlabelled, archs: list[Arch]) -> dict[str, float]:
        """One optimizer step on the step's subnets; returns the loss terms summed over subnets.

        Terms per subnet (SPEC §7): CE on the labelled batch; with ``fm``, FixMatch on the strong
        unlabelled view against pseudo-labels of ``archs[0]`` on the weak view (a_max for ``tofa``,
        the network itself for ``single``); with ``kd`` (``tofa``), distillation of those soft labels
        into the random members; with a strategy teacher (``ps``), distillation of the frozen full
        net's soft labels on the labelled batch.
        """
        net, dev = self.net, self.device
        fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        x, y = (t.to(dev, non_blocking=True) for t in labelled)
        x = x.to(memory_format=fmt)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
        self.optimizer.zero_grad(set_to_none=True)
        pseudo, u_weak, u_strong = None, None, None
        if unlabelled is not None:
            u_weak, u_strong = (t.to(dev, non_blocking=True).to(memory_format=fmt) for t in unlabelled)
            with torch.no_grad(), autocast:
                net.set_active(archs[0])
                pseudo = losses.pseudo_labels(net(resize(u_weak, archs[0].resolution)), self.config.threshold)
        teacher, soft_targets = self.strategy.teacher(), {}
        terms: dict[str, float] = defaultdict(float)
        for position, arch in enumerate(archs):
            net.set_active(arch)
            use_kd = self.use_kd and position >= 2  # KD only for the two random subnets
            parts = [x] + ([u_strong] if self.use_fm else []) + ([u_weak] if use_kd else [])
            images = resize(torch.cat(parts), arch.resolution)
            with autocast:
                logits = net(images).float()
            chunks = logits.split([p.shape[0] for p in parts])
            loss = losses.supervised_loss(chunks[0], y, self.config.label_smoothing)
            terms["sup"] += loss.item()
            if self.use_fm:
                fm = losses.fixmatch_loss(chunks[1], pseudo)
                terms["fm"] += fm.item()
                loss = loss + fm
            if use_kd:
                kd = losses.distillation_loss(chunks[-1], pseudo)
                terms["kd"] += kd.item()
                loss = loss + kd
            if teacher is not None:
                if arch.resolution not in soft_targets:  # subnets of one step often share a resolution
                    with torch.no_grad(), autocast:
                        logits_t = teacher(images[: x.shape[0]]).float()
                    soft_targets[arch.resolution] = losses.pseudo_labels(logits_t, self.config.threshold)
                kd = losses.distillation_loss(chunks[0], soft_targets[arch.resolution])
                terms["kd"] += kd.item()
                loss = loss + kd
            loss.backward()
        dist_utils.average_gradients(list(net.parameters()), self.dist)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.selection.update(self.strategy.indexed(archs), self.step)
        if pseudo is not None:
            terms["mask"] = pseudo.mask.mean().item()
        terms["lr"] = self.scheduler.get_last_lr()[0]
        return dict(terms)

    def _train_mode(self) -> None:
        self.net.train()
        if self.config.freeze_bn:  # running statistics normalise and stay fixed; affine still trains
            for m in self.net.modules():
                if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, ElasticBatchNorm2d)):
                    m.eval()

    def train_epoch(self) -> dict[str, float]:
        epoch = self.epoch
        seed = _epoch_seed(self.config.seed, epoch)
        torch.manual_seed(seed)  # dropout and drop-connect of this epoch
        rng = random.Random(seed)  # subnet sampling: identical on every rank
        self.strategy.start_epoch(self, epoch, rng)
        self._train_mode()
        lab_loader, unl_loader = self._loaders(epoch)
        totals: dict[str, float] = defaultdict(float)
        bar = tqdm(
            zip(lab_loader, unl_loader),
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not self.dist.is_main,
        )
        for labelled, unlabelled in bar:
            terms = self.train_step(labelled, unlabelled, self.strategy.step_archs(rng))
            for k, v in terms.items():
                totals[k] += v
            bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items() if k != "lr"})
        self.epoch += 1
        dist_utils.average_buffers(self.net, self.dist)  # BN running statistics agree on all ranks
        means = {k: v / self.steps_per_epoch for k, v in totals.items()}
        return dist_utils.average_scalars(means, self.dist)

    def save(self) -> None:
        """Write the checkpoint (rank 0 only; the other ranks wait until it is on disk)."""
        if self.dist.is_main:
            save_atomic(self.state_dict(), self.checkpoint_path)
        dist_utils.barrier(self.dist)

    def fit(self, max_epochs: int | None = None) -> None:
        """Train up to ``config.epochs`` (or ``max_epochs`` more), checkpointing after each epoch
        and logging per-term losses to ``train_log.jsonl``."""
        if self.dist.is_main:
            os.makedirs(self.config.out, exist_ok=True)
        target = self.config.epochs if max_epochs is None else min(self.config.epochs, self.epoch + max_epochs)
        log_path = os.path.join(self.config.out, "train_log.jsonl")
        while self.epoch < target:
            start = time.perf_counter()
            terms = self.train_epoch()
            self.save()
            if not self.dist.is_main:
                continue
            record = {"epoch": self.epoch, "step": self.step, "seconds": round(time.perf_counter() - start, 2), **terms}
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True
            )

    # -- evaluation ---------------------------------------------------------------------------

    def calibration_batches(self, resolution: int, batch_size: int = 128) -> list[torch.Tensor]:
        """Un-augmented training images (labelled first, then unlabelled) for BN recalibration."""
        s = self.splits
        sets = [s.labelled] + ([s.unlabelled] if s.unlabelled is not None else [])
        tf = eval_transform(s.size)
        images, budget = [], self.config.calibration_images
        for images_set in sets:
            for i in range(min(len(images_set), budget - len(images))):
                images.append(tf(images_set.image(i)))
        stacked = resize(torch.stack(images), resolution)
        return list(stacked.split(batch_size))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, resolution: int, images: ImageSet | None = None) -> float:
        """Top-1 accuracy in [0, 1] of ``model`` on the test split at ``resolution``."""
        images = images or self.splits.test
        loader = DataLoader(
            _Plain(images, eval_transform(self.splits.size)), batch_size=256, num_workers=self.config.num_workers
        )
        model.eval()
        correct = total = 0
        for x, y in loader:
            logits = model(resize(x.to(self.device), resolution))
            correct += (logits.argmax(1).cpu() == y).sum().item()
            total += len(y)
        return correct / max(total, 1)

    def calibrated_subnet(self, arch: Arch) -> torch.nn.Module:
        from ..nn import recalibrate_bn

        sub = self.net.extract(arch)
        recalibrate_bn(sub, self.calibration_batches(arch.resolution))
        return sub.eval()
