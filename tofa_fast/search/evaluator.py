"""Fast accuracy of many subnets of one trained supernet, BN recalibrated per candidate (SPEC §7).

Validation-based selection (TOFA eq. 5) and population evaluation (the RSS paper's question) measure
hundreds of subnets. The straightforward way — ``run.calibrated_subnet(arch)`` then ``run.evaluate`` —
re-transforms and re-resizes every image, and builds a standalone subnet per candidate (``extract``
spends much of its time constructing layers). :class:`SubnetEvaluator` computes the same numbers:

* calibration and evaluation tensors are built once per resolution (transformed, resized, cached);
* candidates run on the supernet itself with ``set_active`` — its forward equals the extracted
  subnet's to float rounding — and BN statistics are recalibrated in place with the *same* batches
  (``run.calibration_batches``: recalibration depends on the batching, see
  :func:`~tofa_fast.nn.recalibrate_bn`), so the statistics are those the oracle computes;
* evaluation runs in large batches under ``torch.inference_mode`` (eval-mode BN treats every image
  independently, so the batch size does not change the result);
* results are memoised by (split, arch), and the supernet's buffers, active arch and train/eval
  modes are restored after every call, so a network handed to the evaluator is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..nn import Supernet
from ..nn.elastic_batchnorm import ElasticBatchNorm2d
from ..spaces import Arch
from ..train.run_record import Run

CalibrationSource = Callable[[int], Sequence[torch.Tensor]]
_BN_TYPES = (torch.nn.BatchNorm2d, ElasticBatchNorm2d)


def recalibrate_from_batch_statistics(net: torch.nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Set every BN's running statistics to the population mean and (biased) variance of its input
    over ``batches`` — what :func:`tofa_fast.nn.recalibrate_bn` computes, about twice as fast.

    ``recalibrate_bn`` recomputes each BN input's sums in float64 in a forward hook; that arithmetic
    costs more than the forward pass. Here each BN runs in training mode with momentum 1, so
    ``F.batch_norm`` itself leaves the batch's mean and unbiased variance in the running buffers;
    they are read after every batch and pooled in float64 (Chan et al.'s parallel formula, weighted
    by sample count). Same statistics up to float32 rounding of the per-batch moments (relative
    ~1e-7), and the same batching: deeper layers still see activations normalised per batch.
    Leaves the modules in eval mode; the caller restores modes and buffers it cares about.
    """
    bns = [m for m in net.modules() if isinstance(m, _BN_TYPES)]
    shapes: dict[torch.nn.Module, torch.Size] = {}

    def record(module: torch.nn.Module, inputs: tuple) -> None:
        shapes[module] = inputs[0].shape

    momenta = {bn: bn.momentum for bn in bns}
    handles = [bn.register_forward_pre_hook(record) for bn in bns]
    pooled: dict[torch.nn.Module, list] = {}
    try:
        net.eval()
        for bn in bns:
            bn.train()
            bn.momentum = 1.0
        for images in batches:
            shapes.clear()
            net(images)
            for bn, shape in shapes.items():
                c, n = shape[1], shape[0] * shape[2] * shape[3]
                mean = bn.running_mean[:c].double()
                # running_var holds the unbiased batch variance; pool the biased one.
                second = bn.running_var[:c].double() * ((n - 1) / n) + mean**2
                acc = pooled.get(bn)
                if acc is None:
                    pooled[bn] = [mean * n, second * n, n]
                else:
                    acc[0] += mean * n
                    acc[1] += second * n
                    acc[2] += n
    finally:
        for h in handles:
            h.remove()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        net.eval()
    if not pooled:
        raise ValueError("batches is empty: BN recalibration needs at least one batch of images")
    for bn, (total, second, count) in pooled.items():
        mean = total / count
        var = (second / count - mean**2).clamp_min(0)
        c = mean.numel()
        bn.running_mean[:c].copy_(mean.to(bn.running_mean.dtype))
        bn.running_var[:c].copy_(var.to(bn.running_var.dtype))


class SubnetEvaluator:
    """Top-1 accuracy of subnets of ``net`` on labelled image sets, BN recalibrated per subnet.

    Args:
        net: the trained supernet (its weights are read, never changed; BN buffers are restored).
            A net whose weights are in the other layout than ``channels_last`` asks for (training
            leaves them channels-last) is copied once, in this evaluator's layout: images and
            weights in different layouts compute partly in each, and logits would depend on where
            the net came from (a live trainer or a checkpoint) by ~1e-5.
        calibration: ``resolution → list of image batches (N, C, r, r)`` used to recalibrate BN;
            called once per resolution (e.g. :meth:`Run.calibration_batches`).
        images: split name → ``(images, labels)``: float images (N, C, S, S), already normalised,
            at a base size S, and int64 labels (N,). They are resized per subnet resolution with
            the trainer's :func:`~tofa_fast.train.loaders.resize`.
        batch_size: evaluation batch size (larger is faster; it does not change results).
        cache_resolutions: how many resolutions' tensors are kept (least recently used dropped);
            bounds memory on spaces with many large resolutions.
        channels_last: run in channels-last layout. On CPU the recalibration pass (training-mode
            batch norm) is ~1.7× faster in it, ~1.5× per candidate on digits, but BN statistics
            then come from a different reduction order and logits drift from the contiguous
            oracle's by up to ~1e-4 (trained digits run) instead of ~2e-6; off by default.
        missing: split name → why the split is absent (raised when it is asked for).

    Use :meth:`from_run` to build one from a :class:`~tofa_fast.train.Run`.
    """

    def __init__(
        self,
        net: Supernet,
        calibration: CalibrationSource,
        images: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        *,
        batch_size: int = 1024,
        cache_resolutions: int = 8,
        channels_last: bool = False,
        missing: Mapping[str, str] | None = None,
    ):
        if not isinstance(net, Supernet):
            raise TypeError(f"net must be a tofa_fast Supernet, got {type(net).__name__}")
        for name, value in (("batch_size", batch_size), ("cache_resolutions", cache_resolutions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.net, self.space = net, net.space
        self.device = next(net.parameters()).device
        self._calibration = calibration
        self._images: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split, (x, y) in images.items():
            if x.dim() != 4 or x.shape[1] != self.space.in_channels:
                raise ValueError(
                    f"images[{split!r}] must have shape (N, {self.space.in_channels}, S, S), got {tuple(x.shape)}"
                )
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels of images[{split!r}] must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            if x.shape[0] == 0:
                raise ValueError(f"images[{split!r}] is empty")
            self._images[split] = (x.float(), y.long().to(self.device))
        self._missing = dict(missing or {})
        self.batch_size, self.cache_resolutions = batch_size, cache_resolutions
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if any(p.dim() == 4 and not p.is_contiguous(memory_format=self.memory_format) for p in net.parameters()):
            self.net = copy.deepcopy(net).to(memory_format=self.memory_format)
        self._per_resolution: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._memo: dict[tuple[str, str], float] = {}
        self.evaluations = 0  # distinct (split, arch) pairs measured, memo hits excluded

    @classmethod
    def from_run(cls, run: Run, splits: Iterable[str] = ("val", "test"), **kwargs: Any) -> SubnetEvaluator:
        """An evaluator on ``run.net`` for the run's ``splits`` (names of
        :class:`~tofa_fast.train.data.DataSplits` labelled sets: ``"val"``, ``"test"``), calibrating
        BN exactly as :meth:`Run.calibrated_subnet` does. Splits the run lacks are remembered and
        refused with an explanation when asked for."""
        from ..train.evaluation import eval_transform_for

        tf = eval_transform_for(run.splits, run.space)
        images, missing = {}, {}
        for split in splits:
            image_set = getattr(run.splits, split, None)
            if split not in ("val", "test", "labelled"):
                raise ValueError(f"splits must name labelled splits ('val', 'test', 'labelled'), got {split!r}")
            if image_set is None:
                missing[split] = (
                    "this run has no validation split: train with --val-per-class N (TrainConfig(val_per_class=N))"
                    if split == "val"
                    else f"this run has no {split!r} split"
                )
                continue
            x = torch.stack([tf(image_set.image(i)) for i in range(len(image_set))])
            images[split] = (x, image_set.labels)
        return cls(run.net, run.calibration_batches, images, missing=missing, **kwargs)

    # -- public -------------------------------------------------------------------------------

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._images)

    def accuracy(
        self, archs: Arch | Mapping[str, Any] | Iterable[Arch | Mapping[str, Any]] | np.ndarray, split: str = "val"
    ) -> np.ndarray:
        """Top-1 accuracy in [0, 1] of each arch on ``split``: float64 (n,) in input order.

        ``archs``: :class:`Arch` objects, arch dicts, or the int codes of ``space.encode``
        (n, code_length). Archs measured before (on this split) are not measured again.
        """
        self.require(split)
        archs = self._as_archs(archs)
        keys = [str(a) for a in archs]
        todo: dict[str, Arch] = {}
        for key, arch in zip(keys, archs):
            if (split, key) not in self._memo:
                todo.setdefault(key, arch)
        if todo:
            # Resolution-major order: each resolution's tensors are fetched once per call.
            ordered = sorted(todo.values(), key=lambda a: a.resolution)
            with self._preserved():
                for arch in ordered:
                    self._memo[(split, str(arch))] = self._measure(arch, split)
                    self.evaluations += 1
        return np.array([self._memo[(split, key)] for key in keys], dtype=np.float64)

    def fitness(self, split: str = "val") -> Callable[[np.ndarray], np.ndarray]:
        """``codes → accuracy`` on ``split``: the fitness the searches of :mod:`.evolution` maximise."""
        self.require(split)
        return lambda codes: self.accuracy(np.asarray(codes), split)

    def logits(self, arch: Arch | Mapping[str, Any], split: str = "val") -> torch.Tensor:
        """Logits (N, num_classes) of ``arch`` on ``split`` after BN recalibration (for checking the
        evaluator against the extracted-subnet oracle; not memoised)."""
        self.require(split)
        arch = self.space.check(arch)
        with self._preserved():
            return self._forward(arch, split, keep_logits=True)[1]

    def clear(self) -> None:
        """Forget memoised results and cached tensors (e.g. after the supernet's weights change)."""
        self._memo.clear()
        self._per_resolution.clear()

    # -- internals ----------------------------------------------------------------------------

    def require(self, split: str) -> None:
        """Raise ``ValueError`` explaining why ``split`` cannot be measured, if it cannot."""
        if split in self._images:
            return
        if split in self._missing:
            raise ValueError(f"split {split!r} is not available: {self._missing[split]}")
        raise ValueError(f"split must be one of {list(self._images)}, got {split!r}")

    def _as_archs(self, archs: Any) -> list[Arch]:
        if isinstance(archs, torch.Tensor):
            archs = archs.detach().cpu().numpy()
        if isinstance(archs, np.ndarray):
            return self.space.decode(archs)
        if isinstance(archs, (Arch, Mapping)):
            return [self.space.check(archs)]
        return [a if isinstance(a, Arch) else self.space.check(a) for a in archs]

    def _tensors(self, resolution: int) -> dict[str, Any]:
        from ..train.loaders import resize

        entry = self._per_resolution.get(resolution)
        if entry is None:
            batches = [b.to(self.device, memory_format=self.memory_format) for b in self._calibration(resolution)]
            if not batches:
                raise ValueError("calibration returned no batches: BN recalibration needs images")
            entry = {"calibration": batches}
            for split, (x, y) in self._images.items():
                x = resize(x, resolution).to(self.device, memory_format=self.memory_format)
                entry[split] = (x.split(self.batch_size), y.split(self.batch_size))
            self._per_resolution[resolution] = entry
            while len(self._per_resolution) > self.cache_resolutions:
                self._per_resolution.popitem(last=False)
        self._per_resolution.move_to_end(resolution)
        return entry

    def _forward(self, arch: Arch, split: str, keep_logits: bool) -> tuple[int, torch.Tensor | None]:
        entry = self._tensors(arch.resolution)
        net = self.net
        net.set_active(arch)
        with torch.inference_mode():
            recalibrate_from_batch_statistics(net, entry["calibration"])
            correct, outputs = 0, []
            for x, y in zip(*entry[split]):
                logits = net(x)
                correct += int((logits.argmax(1) == y).sum())
                if keep_logits:
                    outputs.append(logits)
        return correct, (torch.cat(outputs) if keep_logits else None)

    def _measure(self, arch: Arch, split: str) -> float:
        correct, _ = self._forward(arch, split, keep_logits=False)
        return correct / self._images[split][0].shape[0]

    @contextlib.contextmanager
    def _preserved(self) -> Iterator[None]:
        """Restore every buffer (BN statistics, batch counters), the active arch and each module's
        train/eval mode on exit: recalibration rewrites BN statistics in place."""
        net = self.net
        active = net.active_arch
        modes = {m: m.training for m in net.modules()}
        saved = [(b, b.detach().clone()) for b in net.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
            net.set_active(active)
            for module, mode in modes.items():
                module.train(mode)
