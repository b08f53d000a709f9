"""``--init SOURCE`` strings of ``tofa-fast train`` → a pretrained supernet re-headed for the task.

Grammar (one of)::

    ofa:PATH                         an OFA MobileNetV3 checkpoint file (torch.save of the model's
                                     state dict, or OFA's {"state_dict": ...}), loaded weights-only
    torchvision:NAME[:WEIGHTS]       NAME ∈ {mobilenet_v3_large, mobilenet_v3_small}; WEIGHTS is a
                                     torchvision weights name (IMAGENET1K_V1, DEFAULT, …), default
                                     none (random initialisation)

Pretrained torchvision weights are read from torchvision's download cache
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``); nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..nn import Supernet
from .ofa_mbv3 import from_ofa
from .torchvision_mbv3 import from_torchvision

#: torchvision models :func:`load_init` knows how to convert.
TORCHVISION_MODELS: tuple[str, ...] = ("mobilenet_v3_large", "mobilenet_v3_small")

_GRAMMAR = "ofa:PATH or torchvision:NAME[:WEIGHTS] (NAME: " + ", ".join(TORCHVISION_MODELS) + ")"


def load_init(source: str, num_classes: int, download: bool = False) -> Supernet:
    """Build the supernet an ``--init SOURCE`` string names, with a fresh ``num_classes`` classifier.

    Everything but the classifier comes from the pretrained network; the classifier is newly
    initialised for the task's classes (even if their number equals the pretrained one's, since the
    classes differ).

    Args:
        source: ``ofa:PATH`` or ``torchvision:NAME[:WEIGHTS]`` (module docstring).
        num_classes: outputs of the new classifier.
        download: let torchvision fetch missing pretrained weights (needs a network).

    Raises:
        ValueError: a malformed source, an unknown model or weights name, a checkpoint that is not
            a weights-only state dict or does not fit (:class:`CheckpointMismatchError`).
        FileNotFoundError: the OFA checkpoint or the cached torchvision weights are missing.
    """
    if not isinstance(source, str) or ":" not in source:
        raise ValueError(f"--init source must be {_GRAMMAR}; got {source!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    kind, rest = source.split(":", 1)
    if kind == "ofa":
        return from_ofa(_load_checkpoint(rest), num_classes=num_classes)
    if kind == "torchvision":
        name, _, weights = rest.partition(":")
        model = _torchvision_model(name, weights or None, download)
        return from_torchvision(model, num_classes=num_classes, name=f"torchvision_{name}")
    raise ValueError(f"--init source must be {_GRAMMAR}; got {source!r} (unknown kind {kind!r})")


def _load_checkpoint(path: str) -> dict:
    if not path:
        raise ValueError(f"--init ofa:PATH needs a path; expected {_GRAMMAR}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"OFA checkpoint {str(file)!r} does not exist")
    try:
        # weights_only: a checkpoint is data; never execute pickled code from it (SPEC §12).
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{str(file)!r} is not a weights-only PyTorch checkpoint (torch.load(weights_only=True) failed: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{str(file)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _torchvision_model(name: str, weights: str | None, download: bool) -> torch.nn.Module:
    from torchvision import models

    if name not in TORCHVISION_MODELS:
        raise ValueError(f"--init torchvision:{name}: unknown model; supported: {list(TORCHVISION_MODELS)}")
    if weights is None:
        return models.get_model(name, weights=None)
    enum = models.get_model_weights(name)
    try:
        chosen = enum.verify(weights)
    except KeyError:
        raise ValueError(
            f"--init torchvision:{name}:{weights}: unknown weights; available: {list(enum.__members__)}"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(chosen.url)
    if not cached.is_file() and not download:
        raise FileNotFoundError(
            f"torchvision weights {chosen} are not in the local cache {str(cached)!r}. On a machine with a "
            f'network, fetch them with `python -c "import torchvision; torchvision.models.{name}'
            f"(weights='{chosen.name}')\"` and copy the file there (or set TORCH_HOME), or pass download=True."
        )
    model = models.get_model(name, weights=None, num_classes=len(chosen.meta["categories"]))
    try:
        # Not torchvision's own loader: it unpickles cached files with weights_only=False (SPEC §12).
        state = torch.hub.load_state_dict_from_url(chosen.url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not load torchvision weights {chosen} from {str(cached)!r}: {exc}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{str(cached)!r} does not hold {chosen}: {exc}") from exc
    return model
