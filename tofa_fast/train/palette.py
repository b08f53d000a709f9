"""The run's deliverables (SPEC §10): ``palette.json``, ``report.md`` and ``pareto.png``.

The palette picks, for a spread of FLOPs budgets, the subnet TOFA's zero-cost rule selects
(:class:`SelectionIndex`), then measures each one: extracted, BN recalibrated on training images,
tested. Budgets are geometrically spaced between the FLOPs of the min and the max subnet.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from ..spaces import Arch
from .checkpoint import write_text_atomic
from .run_record import Run


def palette_budgets(flops: list[float], count: int) -> list[float]:
    lo, hi = min(flops), max(flops)
    if count == 1 or hi <= lo:
        return [hi]
    return [float(b) for b in np.geomspace(lo, hi, count)]


def build_palette(run: Run, estimator, progress: bool = True) -> list[dict]:
    """Select and evaluate one subnet per budget; entries sorted by FLOPs, duplicates merged,
    budgets no trained subnet fits left out."""
    from tqdm import tqdm

    space = run.space
    flops = [float(f) for f in estimator.flops([space.min_arch(), space.max_arch()])]
    chosen: dict[str, tuple[float, Arch]] = {}
    failure = None
    for budget in palette_budgets(flops, run.config.palette_size):
        try:
            arch = run.zero_cost_choice(estimator.flops, budget, "FLOPs")
        except ValueError as exc:  # e.g. strategy "single": nothing trained below its one arch
            failure = failure or exc
            continue
        chosen.setdefault(str(arch), (budget, arch))
    if not chosen:
        raise failure or ValueError("no subnet to put in the palette")
    entries = [
        {"budget_mflops": round(budget / 1e6, 4), **measure_subnet(run, estimator, arch)}
        for budget, arch in tqdm(list(chosen.values()), desc="palette", disable=not progress, leave=False)
    ]
    return sorted(entries, key=lambda e: e["flops"])


def measure_subnet(run: Run, estimator, arch: Arch) -> dict:
    """A palette entry's measurements of ``arch``: its dict, FLOPs, parameters and test accuracy
    (extracted, BN recalibrated on training images)."""
    return {
        "arch": arch.to_dict(),
        "flops": int(estimator.flops([arch])[0]),
        "params": int(estimator.params([arch])[0]),
        "accuracy": run.evaluate(run.calibrated_subnet(arch), arch.resolution),
    }


def write_outputs(out: str, palette: list[dict], config: dict, seconds: float, extra: dict | None = None) -> None:
    write_text_atomic(json.dumps(palette, indent=2) + "\n", os.path.join(out, "palette.json"))
    write_text_atomic(report_markdown(palette, config, seconds, extra or {}), os.path.join(out, "report.md"))
    plot_pareto(
        palette, os.path.join(out, "pareto.png"), title=f"{config['data']} — {config['strategy']} ({config['loss']})"
    )


def report_markdown(palette: list[dict], config: dict, seconds: float, extra: dict) -> str:
    lines = [
        f"# tofa_fast run: {config['data']}",
        "",
        f"- strategy `{config['strategy']}`, loss `{config['loss']}`, space `{config['space']}`, "
        f"{config['epochs']} epochs, seed {config['seed']}",
        f"- wall time {seconds / 60:.1f} min; written {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]
    for k, v in extra.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| budget MFLOPs | MFLOPs | params | accuracy | arch |", "|---:|---:|---:|---:|---|"]
    for e in palette:
        arch = e["arch"]
        short = f"r{arch['resolution']} " + " ".join(f"{s['width']}×{s['depth']}" for s in arch["stages"])
        lines.append(
            f"| {e['budget_mflops']:.2f} | {e['flops'] / 1e6:.2f} | {e['params']:,} | {e['accuracy']:.2%} | {short} |"
        )
    return "\n".join(lines) + "\n"


def plot_pareto(palette: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    mflops = [e["flops"] / 1e6 for e in palette]
    acc = [100 * e["accuracy"] for e in palette]
    ax.plot(mflops, acc, "o-", color="tab:blue")
    ax.set_xlabel("MFLOPs")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
