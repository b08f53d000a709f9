"""Tiny trained supernets with a validation split, shared by the tests/test_search_*.py files."""

from __future__ import annotations

from tofa_fast.train import Run, TrainConfig, Trainer
from tofa_fast.train.data import DataSplits, load_digits


def tiny_val_splits() -> DataSplits:
    """Digits with 2 labelled and 2 validation images per class, 40 unlabelled, 30 test images."""
    splits = load_digits(labels_per_class=2, seed=0, size=32, val_per_class=2)
    splits.unlabelled = splits.unlabelled.subset(range(40))
    splits.test = splits.test.subset(range(0, 360, 12))
    return splits


def tiny_run(out, epochs: int = 1, val_per_class: int | None = 2, **kw) -> Run:
    """A run trained for ``epochs`` tiny epochs (a few seconds): weights and a selection index
    that are not the initial ones, which is all the search code needs."""
    config = TrainConfig(
        out=str(out),
        epochs=epochs,
        batch_size=8,
        seed=1,
        palette_size=2,
        calibration_images=40,
        device="cpu",
        val_per_class=val_per_class,
        **kw,
    )
    splits = tiny_val_splits()
    if val_per_class is None:
        splits.val = None
    trainer = Trainer(config, splits=splits)
    trainer.fit()
    return trainer.run()


def one_thread():
    """Generator for a fixture: torch on one thread while the search tests run, restored after.
    Their tensors are tiny; on a busy 2-core machine a second thread only adds contention."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
