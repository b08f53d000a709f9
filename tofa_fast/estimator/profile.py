"""``tofa-fast profile``: measure a latency table on this device, or validate one.

Build (resumable)::

    tofa-fast profile --space rss --device cpu -o rss_cpu.json [--batch-size 1] [--threads 1]
                      [--passes 3] [--calibration 16] [--time-budget 600]

times every distinct layer configuration the space can produce (:meth:`TableLayout.configs`) as
the plain PyTorch modules an extracted subnet is made of, writing the table atomically every few
seconds. Interrupted (Ctrl-C, SIGTERM, ``--time-budget``), the same command resumes where it
stopped. ``--calibration`` random subnets are also timed end to end, and the whole-network
correction of :mod:`.latency` is fitted on them.

Validate::

    tofa-fast profile --validate rss_cpu.json [--samples 50] [--seed 0]

times random extracted subnets end to end (other subnets than the calibration ones) and reports the
Spearman rank correlation of predicted vs measured latency and the share predicted within ±10%.

How it times, and why:

* inference mode, warm-up, then the *minimum* over repeats of the mean time of a block of calls,
  and the minimum again over ``--passes`` passes spread over the whole run: on a shared machine
  other processes only ever add time, so minima are the reproducible part;
* one CPU thread is timed with the thread's CPU clock (:func:`timing_clock`), which ignores the
  time other processes hold the core;
* layers run with *cold weights* (:func:`time_layer`): inside a subnet the other layers evict a
  layer's weights from the caches, and at batch 1 loading them is much of its cost;
* the calibration subnets are timed once per pass, interleaved with the layers, so the fit sees the
  same moments of load as the table it corrects.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import spaces
from ..backends import cpu_model
from ..nn.activations import build_activation
from ..nn.elastic_se import SqueezeExcite
from ..nn.mbconv import MBConvBlock
from ..nn.padding import static_conv2d
from ..spaces import Arch, SearchSpace
from .estimator import Estimator
from .latency import LatencyTable, space_fingerprint
from .layers import HeadConfig, LayerConfig, MBConvConfig, StemConfig, arch_layers
from .layout import TableLayout

CALIBRATION_SEED = 10_000  # calibration subnets: seeds 10000.., validation defaults to 0..
SAVE_EVERY_S = 5.0
MAX_COPIES = 32  # cold-weight timing: copies of a layer cycled through (small layers stay few KiB)


# ----------------------------------------------------------------------------------------------
# Layer modules, exactly as Supernet.extract builds them
# ----------------------------------------------------------------------------------------------


def build_layer(config: LayerConfig, space: SearchSpace) -> nn.Module:
    """The plain PyTorch module an extracted subnet uses for ``config`` (random weights, eval mode).

    Mirrors ``Supernet.extract`` / ``ElasticMBConv.extract`` module for module, so a layer is timed
    with the kernels the whole subnet runs; tests check the structures stay identical.
    """
    bn = {"eps": space.bn_eps, "momentum": space.bn_momentum}
    if isinstance(config, StemConfig):
        c = config
        layer = nn.Sequential(
            static_conv2d(c.in_channels, c.out_channels, c.kernel, c.stride, padding=space.padding),
            nn.BatchNorm2d(c.out_channels, **bn),
            build_activation(c.act),
        )
    elif isinstance(config, MBConvConfig):
        c, mid = config, config.mid_channels
        expand = None
        if c.expand_conv:
            expand = nn.Sequential(
                nn.Conv2d(c.in_channels, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid, **bn), build_activation(c.act)
            )
        depthwise = [
            static_conv2d(mid, mid, c.kernel, c.stride, groups=mid, padding=space.padding),
            nn.BatchNorm2d(mid, **bn),
            build_activation(c.act),
        ]
        if c.se_channels:
            depthwise.append(
                SqueezeExcite(nn.Conv2d(mid, c.se_channels, 1, bias=True), nn.Conv2d(c.se_channels, mid, 1, bias=True))
            )
        project = nn.Sequential(
            nn.Conv2d(mid, c.out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(c.out_channels, **bn)
        )
        layer = MBConvBlock(expand, nn.Sequential(*depthwise), project, c.residual)
    elif isinstance(config, HeadConfig):
        c = config
        mix = []
        if c.feature_mix:
            mix = [
                nn.Conv2d(c.final_channels, c.head_channels, 1, 1, 0, bias=c.feature_mix_bias),
                build_activation(c.act),
            ]
        layer = nn.Sequential(
            nn.Conv2d(c.in_channels, c.final_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c.final_channels, **bn),
            build_activation(c.act),
            nn.AdaptiveAvgPool2d(1),
            *mix,
            nn.Flatten(1),
            nn.Dropout(space.head.dropout),
            nn.Linear(c.head_channels, c.num_classes),
        )
    else:
        raise TypeError(f"not a layer config: {config!r}")
    return layer.eval().requires_grad_(False)


def layer_input(config: LayerConfig, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch_size, config.in_channels, config.size, config.size, device=device)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_clock(device: torch.device) -> tuple[str, Callable[[], float]]:
    """The clock latencies are read from, and its name (recorded in the table).

    On a CPU with one intra-op thread, the calling thread's CPU time: it is the wall time the same
    work takes on an idle machine, but it does not count the time other processes hold the core —
    which on a shared machine is most of the noise. Otherwise (GPU, several threads) wall time.
    """
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return "thread_cpu", time.thread_time
    return "wall", time.perf_counter


def cache_bytes() -> int:
    """Twice the last-level cache (Linux sysfs; 64 MiB when unknown): what cold-weight timing rotates through."""
    sizes = []
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return 2 * max(sizes) if sizes else 64 << 20


@torch.inference_mode()
def time_call(
    fn: Callable[[], object],
    device: torch.device,
    min_time_s: float = 0.05,
    repeats: int = 7,
    clock: Callable[[], float] | None = None,
) -> float:
    """Milliseconds per call of ``fn``: after warm-up, the minimum over ``repeats`` blocks of the
    mean over a block of calls sized to take about ``min_time_s / repeats``."""
    clock = clock or timing_clock(device)[1]
    _synchronize(device)
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < min_time_s / 5:
        fn()
        calls += 1
    _synchronize(device)
    per_call = (time.perf_counter() - start) / calls
    inner = max(1, math.ceil(min_time_s / repeats / max(per_call, 1e-7)))
    best = math.inf
    for _ in range(repeats):
        _synchronize(device)
        t0 = clock()
        for _ in range(inner):
            fn()
        _synchronize(device)
        best = min(best, (clock() - t0) / inner)
    return best * 1e3


def time_layer(config: LayerConfig, space: SearchSpace, settings: ProfileSettings) -> float:
    """Milliseconds per call of ``config``'s module with *cold weights*.

    Timed alone and repeatedly, a layer keeps its weights in cache; inside a subnet the other layers
    evict them, and at batch 1 loading weights is much of a layer's cost (a 1×1 conv on a 2×2 map
    does one multiply-add per weight). So calls rotate over enough copies of the layer (distinct
    weights, same shapes) to overflow the last-level cache twice; the input stays warm, as it is in
    a subnet, where the previous layer just wrote it.
    """
    device = settings.device
    first = build_layer(config, space).to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in first.parameters()) or 1
    copies = max(1, min(MAX_COPIES, math.ceil(settings.cold_bytes / weight_bytes)))
    state = first.state_dict()
    modules = [first]
    for _ in range(copies - 1):
        # Built on the meta device (no weight initialisation, the slow part), then given the first
        # copy's values: same numbers (no denormal or NaN surprises), separate memory.
        with torch.device("meta"):
            copy = build_layer(config, space)
        copy = copy.to_empty(device=device)
        copy.load_state_dict(state)
        modules.append(copy)
    x = layer_input(config, settings.batch_size, device)
    turn = itertools.cycle(modules)
    return time_call(lambda: next(turn)(x), device, settings.min_time_s, settings.repeats)


# ----------------------------------------------------------------------------------------------
# Building a table
# ----------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


@dataclass
class ProfileSettings:
    """What ``tofa-fast profile`` measures under (the table records it)."""

    device: torch.device
    batch_size: int = 1
    num_classes: int = 1000
    threads: int | None = None  # None: torch's current intra-op thread count
    min_time_s: float = 0.05
    repeats: int = 7
    calibration: int = 16
    passes: int = 3
    time_budget_s: float | None = None
    cold_bytes: int = 0  # 0: twice the last-level cache (cache_bytes())

    def __post_init__(self) -> None:
        if self.cold_bytes <= 0:
            self.cold_bytes = cache_bytes()


def _new_table(space: SearchSpace, layout: TableLayout, settings: ProfileSettings) -> LatencyTable:
    return LatencyTable(
        space=space.name,
        space_fingerprint=space_fingerprint(space),
        device=settings.device.type,
        device_name=device_name(settings.device),
        batch_size=settings.batch_size,
        num_classes=settings.num_classes,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        expected=len(layout.configs()),
        clock=timing_clock(settings.device)[0],
        passes=settings.passes,
    )


def _resume(path: str, fresh: LatencyTable) -> LatencyTable:
    """The table at ``path`` if it was measured under the same conditions, else a clear error."""
    if not os.path.exists(path):
        return fresh
    old = LatencyTable.load(path)
    for name in (
        "space_fingerprint",
        "device",
        "device_name",
        "batch_size",
        "num_classes",
        "threads",
        "clock",
        "expected",
    ):
        if getattr(old, name) != getattr(fresh, name):
            raise ValueError(
                f"{path} holds a latency table measured with {name}={getattr(old, name)!r}, this run has "
                f"{getattr(fresh, name)!r}; write to another file (-o) or delete it to start over"
            )
    return old


def profile_space(
    space: SearchSpace, output: str, settings: ProfileSettings, log: Callable[[str], None] = print
) -> LatencyTable:
    """Measure (or resume measuring) the latency table of ``space`` into ``output``; see module docstring.

    Every configuration is timed in ``settings.passes`` passes over the whole list and keeps the
    minimum: on a shared machine the load changes over seconds, and passes spread apart in time make
    every entry the latency of a quiet moment. The calibration subnets are timed once per pass too,
    interleaved with the layers, so that both sides of the calibration fit see the same moments.
    """
    from tqdm.auto import tqdm

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    layout = TableLayout.build(space, settings.num_classes)
    configs = layout.configs()
    table = _resume(output, _new_table(space, layout, settings))
    calibration_archs = [space.sample(CALIBRATION_SEED + i) for i in range(settings.calibration)]
    if sorted(table.calibration_ms) != sorted(str(a) for a in calibration_archs):
        table.calibration_ms, table.calibration_passes, table.calibration = {}, 0, None
    done = sum(table.counts.values())
    total = table.passes * len(configs)
    if done:
        log(f"resuming {output}: {done} of {total} layer timings already done")
    deadline = None if settings.time_budget_s is None else time.monotonic() + settings.time_budget_s
    last_save = time.monotonic()
    stopped = None
    bar = tqdm(total=total, initial=done, desc=f"profiling {space.name} layers", unit="layer")
    try:
        for pass_index in range(table.passes):
            for key, config in configs.items():
                if table.counts.get(key, 0) > pass_index:
                    continue
                if deadline is not None and time.monotonic() > deadline:
                    stopped = "time budget reached"
                    break
                ms = time_layer(config, space, settings)
                table.entries[key] = min(ms, table.entries.get(key, math.inf))
                table.counts[key] = pass_index + 1
                bar.update()
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    table.save(output)
                    last_save = time.monotonic()
            if stopped:
                break
            if calibration_archs and table.calibration_passes <= pass_index:
                measured = measure_subnets(
                    space,
                    calibration_archs,
                    table,
                    settings,
                    f"timing calibration subnets ({pass_index + 1})",
                    passes=1,
                )
                for arch, ms in zip(calibration_archs, measured):
                    table.calibration_ms[str(arch)] = min(ms, table.calibration_ms.get(str(arch), math.inf))
                table.calibration_passes = pass_index + 1
                table.save(output)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
        table.save(output)
    if not table.complete or (calibration_archs and table.calibration_passes < table.passes):
        log(
            f"{stopped or 'stopped'}: {sum(table.counts.values())} of {total} layer timings saved to {output}; "
            "run the same command again to resume"
        )
        return table
    if calibration_archs and not table.calibrated:
        calibrate(space, table, calibration_archs, log)
        table.save(output)
    log(f"latency table of {space.name!r} ({table.expected} layer configurations) written to {output}")
    return table


def measure_subnets(
    space: SearchSpace,
    archs: Sequence[Arch],
    table: LatencyTable,
    settings: ProfileSettings,
    desc: str,
    passes: int | None = None,
) -> np.ndarray:
    """End-to-end latency (ms) of each extracted subnet: timed like the layers, in ``passes``
    (default ``table.passes``) round-robin passes keeping the minimum, each subnet extracted afresh
    in each pass to bound memory."""
    from tqdm.auto import tqdm

    from ..nn import Supernet

    passes = table.passes if passes is None else passes
    supernet = Supernet(space, table.num_classes).requires_grad_(False)
    measured = np.full(len(archs), np.inf)
    with tqdm(total=passes * len(archs), desc=desc, unit="subnet") as bar:
        for _ in range(passes):
            for i, arch in enumerate(archs):
                sub = supernet.extract(arch).eval().requires_grad_(False).to(settings.device)
                r = arch.resolution
                x = torch.randn(table.batch_size, space.in_channels, r, r, device=settings.device)
                ms = time_call(functools.partial(sub, x), settings.device, settings.min_time_s * 4, settings.repeats)
                measured[i] = min(measured[i], ms)
                bar.update()
    return measured


def calibrate(space: SearchSpace, table: LatencyTable, archs: Sequence[Arch], log=print) -> None:
    """Fit ``scale``, ``layer_overhead_ms`` and ``offset_ms`` on the calibration subnets' timings
    (least squares on measured = scale·Σ t + overhead·n_layers + offset)."""
    measured = np.asarray([table.calibration_ms[str(a)] for a in archs])
    layer_sums, layer_counts = [], []
    for arch in archs:
        layers = arch_layers(space, arch, table.num_classes)
        layer_sums.append(sum(table.layer_latency(c.key) for c in layers))
        layer_counts.append(len(layers))
    features = np.stack([layer_sums, layer_counts, np.ones(len(archs))], axis=1)
    # Relative least squares: each subnet's error counts in proportion to its latency (the ±10%
    # criterion is relative), so weight rows by 1 / measured.
    weights = 1.0 / measured
    coef, *_ = np.linalg.lstsq(features * weights[:, None], measured * weights, rcond=None)
    scale, overhead, offset = (float(v) for v in coef)
    if not (0.25 < scale < 4.0):  # a degenerate fit (too few or too similar subnets): keep it simple
        scale, overhead = 1.0, 0.0
        offset = float(np.median(measured - np.asarray(layer_sums)))
    table.scale, table.layer_overhead_ms, table.offset_ms = scale, overhead, offset
    predicted = features @ np.array([scale, overhead, offset])
    table.calibration = {
        "subnets": [str(a) for a in archs],
        "measured_ms": measured.tolist(),
        "layer_sum_ms": [float(v) for v in layer_sums],
        "max_relative_error": float(np.max(np.abs(predicted - measured) / measured)),
    }
    log(
        f"calibration on {len(archs)} subnets: latency = {scale:.4f}·Σ layers + {overhead * 1e3:.1f} µs·layers + "
        f"{offset * 1e3:.1f} µs (max relative error {table.calibration['max_relative_error']:.1%})"
    )


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # average ties
            tied = x == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra**2).sum() * (rb**2).sum()))


@dataclass
class ValidationReport:
    space: str
    device_name: str
    samples: int
    spearman: float
    within_10pct: float
    median_relative_error: float
    predicted_ms: list[float]
    measured_ms: list[float]
    archs: list[str]

    def summary(self) -> str:
        return (
            f"{self.space} on {self.device_name}: {self.samples} subnets, Spearman {self.spearman:.3f}, "
            f"{self.within_10pct:.0%} within ±10%, median |error| {self.median_relative_error:.1%}"
        )


def validate_table(
    path: str, samples: int = 50, seed: int = 0, settings: ProfileSettings | None = None, device: str | None = None
) -> ValidationReport:
    """Time ``samples`` random subnets end to end and compare with the table's predictions."""
    table = LatencyTable.load(path)
    space = spaces.get(table.space) if table.space in spaces.names() else None
    if space is None or space_fingerprint(space) != table.space_fingerprint:
        raise ValueError(
            f"{path} was measured for space {table.space!r} (fingerprint {table.space_fingerprint}), which is not "
            f"a preset this version knows; validate it from Python with the SearchSpace it was built for"
        )
    if device is not None and torch.device(device).type != table.device:
        raise ValueError(f"{path} was measured on device {table.device!r} ({table.device_name}), not on {device!r}")
    settings = settings or ProfileSettings(device=torch.device(table.device))
    settings.device = torch.device(device or table.device)
    if settings.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{path} was measured on CUDA ({table.device_name}), but no CUDA device is visible")
    torch.set_num_threads(table.threads)  # predictions hold for the thread count it was measured with
    estimator = Estimator(space, table.num_classes, latency_table=table, device=table.device)
    archs = [space.sample(seed + i) for i in range(samples)]
    measured = measure_subnets(space, archs, table, settings, "timing whole subnets")
    predicted = np.asarray(estimator.latency(archs))
    relative = np.abs(predicted - measured) / measured
    return ValidationReport(
        space=space.name,
        device_name=table.device_name,
        samples=samples,
        spearman=spearman(predicted, measured),
        within_10pct=float((relative <= 0.10).mean()),
        median_relative_error=float(np.median(relative)),
        predicted_ms=predicted.tolist(),
        measured_ms=measured.tolist(),
        archs=[str(a) for a in archs],
    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """Entry of ``tofa-fast profile`` (flags defined in :mod:`tofa_fast.cli`)."""
    settings = ProfileSettings(
        device=torch.device(args.device or "cpu"),
        batch_size=args.batch_size,
        num_classes=args.num_classes,
        threads=args.threads,
        min_time_s=args.min_time,
        calibration=args.calibration,
        passes=args.passes,
        cold_bytes=int(args.cold_mib * (1 << 20)),
        time_budget_s=args.time_budget,
    )
    # SIGTERM (a batch system's time limit) is handled like Ctrl-C: the partial table is saved.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.validate:
            report = validate_table(args.validate, args.samples, args.seed, settings, args.device)
            print(report.summary())
            if args.output:
                with open(args.output, "w") as f:
                    json.dump(report.__dict__, f, indent=1)
            return 0
        if not args.output:
            print("tofa-fast profile: -o/--output FILE is required to build a table", file=sys.stderr)
            return 2
        if settings.device.type == "cuda" and not torch.cuda.is_available():
            print("tofa-fast profile: --device cuda asked for, but no CUDA device is visible", file=sys.stderr)
            return 2
        space = spaces.get(args.space)
        table = profile_space(space, args.output, settings)
        return 0 if table.complete else 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"tofa-fast profile: {exc}", file=sys.stderr)
        return 2
