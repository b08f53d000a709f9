"""``--init SOURCE`` strings of ``tofa-fast train`` → a pretrained supernet re-headed for the task.

Grammar (one of)::

    ofa:PATH                         an OFA MobileNetV3 checkpoint file (torch.save of the model's
                                     state dict, or OFA's {"state_dict": ...}), loaded weights-only
    torchvision:NAME[:WEIGHTS]       NAME ∈ {mobilenet_v3_large, mobilenet_v3_small, mobilenet_v2};
                                     WEIGHTS is a torchvision weights name (IMAGENET1K_V1, DEFAULT,
                                     …), read from torchvision's download cache, or the path of a
                                     local state-dict file (e.g. mobilenet_v2-b0353104.pth);
                                     default none (random initialisation)
    efficientnet_lite:NAME[:PATH]    NAME ∈ {efficientnet-lite0 … efficientnet-lite4}; PATH a local
                                     state-dict file (e.g. efficientnet-lite0-57934424.pth);
                                     default random initialisation. Needs efficientnet_lite_pytorch.

Weight files are loaded with ``torch.load(weights_only=True)`` into the source network first, keys
and shapes checked exactly (:class:`~.state_dict_mapping.CheckpointMismatchError` lists what
differs); a file that is not a plain state dict (``{"state_dict": ...}`` is unwrapped) is refused.
Cached torchvision weights live in ``torch.hub.get_dir()/checkpoints``, i.e.
``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``; nothing is downloaded
unless ``download=True``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..nn import Supernet
from .efficientnet_lite import EFFICIENTNET_LITE_MODELS, efficientnet_lite_package, from_efficientnet_lite
from .mbconv_import import DEFAULT_RESOLUTIONS
from .ofa_mbv3 import from_ofa
from .state_dict_mapping import load_exactly
from .torchvision_mbv3 import from_torchvision

#: torchvision models :func:`load_init` knows how to convert, with the key of their classifier weight.
TORCHVISION_CLASSIFIERS: dict[str, str] = {
    "mobilenet_v3_large": "classifier.3.weight",
    "mobilenet_v3_small": "classifier.3.weight",
    "mobilenet_v2": "classifier.1.weight",
}
TORCHVISION_MODELS: tuple[str, ...] = tuple(TORCHVISION_CLASSIFIERS)

_GRAMMAR = (
    "ofa:PATH, torchvision:NAME[:WEIGHTS or PATH] (NAME: "
    + ", ".join(TORCHVISION_MODELS)
    + ") or efficientnet_lite:NAME[:PATH] (NAME: "
    + ", ".join(EFFICIENTNET_LITE_MODELS)
    + ")"
)


def load_init(
    source: str, num_classes: int, download: bool = False, resolutions: Sequence[int] | None = None
) -> Supernet:
    """Build the supernet an ``--init SOURCE`` string names, with a fresh ``num_classes`` classifier.

    Everything but the classifier comes from the pretrained network; the classifier is newly
    initialised for the task's classes (even if their number equals the pretrained one's, since the
    classes differ). The input normalisation the network expects is ``net.space.input_mean`` /
    ``input_std`` (ImageNet's, except for EfficientNet-Lite).

    Args:
        source: ``ofa:PATH``, ``torchvision:NAME[:WEIGHTS]`` or ``efficientnet_lite:NAME[:PATH]``
            (module docstring).
        num_classes: outputs of the new classifier.
        download: let torchvision fetch missing pretrained weights (needs a network).
        resolutions: input resolutions of the derived space (torchvision and EfficientNet-Lite
            sources; default 128–224 in steps of 4). OFA's preset fixes its own.

    Raises:
        ValueError: a malformed source, an unknown model or weights name, a checkpoint that is not
            a weights-only state dict or does not fit (:class:`CheckpointMismatchError`).
        FileNotFoundError: the weights file or the cached torchvision weights are missing.
        ImportError: ``efficientnet_lite`` without the efficientnet_lite_pytorch package.
    """
    if not isinstance(source, str) or ":" not in source:
        raise ValueError(f"--init source must be {_GRAMMAR}; got {source!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    kind, rest = source.split(":", 1)
    derived = {"resolutions": tuple(resolutions) if resolutions is not None else DEFAULT_RESOLUTIONS}
    if kind == "ofa":
        if resolutions is not None:
            raise ValueError("resolutions apply to torchvision and efficientnet_lite sources; ofa uses its preset's")
        if not rest:
            raise ValueError(f"--init ofa:PATH needs a path; expected {_GRAMMAR}")
        return from_ofa(_load_state_dict(rest, "OFA checkpoint"), num_classes=num_classes)
    if kind == "torchvision":
        name, _, weights = rest.partition(":")
        model = _torchvision_model(name, weights or None, download)
        return from_torchvision(model, num_classes=num_classes, name=f"torchvision_{name}", **derived)
    if kind == "efficientnet_lite":
        name, _, path = rest.partition(":")
        model = _efficientnet_lite_model(name, path or None)
        return from_efficientnet_lite(model, num_classes=num_classes, name=name.replace("-", "_"), **derived)
    raise ValueError(f"--init source must be {_GRAMMAR}; got {source!r} (unknown kind {kind!r})")


def _load_state_dict(path: str, what: str) -> dict:
    """A state dict from ``path``, loaded weights-only; ``{"state_dict": ...}`` is unwrapped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(file)!r} does not exist")
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


def _tensor_state(path: str, what: str) -> dict[str, torch.Tensor]:
    state = _load_state_dict(path, what)
    if set(state) == {"state_dict"} and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    stray = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if stray:
        raise ValueError(f"{path!r} is not a state dict: {stray[:5]} hold no tensors")
    return state


def _is_path(text: str) -> bool:
    """Whether a WEIGHTS field names a file rather than torchvision weights (``IMAGENET1K_V1``)."""
    return "/" in text or os.sep in text or text.endswith((".pth", ".pt")) or Path(text).is_file()


def _classes_in(state: dict[str, torch.Tensor], classifier_key: str, default: int = 1000) -> int:
    """The class count of the file's classifier, so a fine-tuned file loads too (others fail later, named)."""
    weight = state.get(classifier_key)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else default


def _torchvision_model(name: str, weights: str | None, download: bool) -> torch.nn.Module:
    from torchvision import models

    if name not in TORCHVISION_MODELS:
        raise ValueError(f"--init torchvision:{name}: unknown model; supported: {list(TORCHVISION_MODELS)}")
    if weights is None:
        return models.get_model(name, weights=None)
    if _is_path(weights):
        state = _tensor_state(weights, f"torchvision {name} weights file")
        model = models.get_model(name, weights=None, num_classes=_classes_in(state, TORCHVISION_CLASSIFIERS[name]))
        load_exactly(model, state, f"{weights!r} vs torchvision {name}")
        return model
    enum = models.get_model_weights(name)
    try:
        chosen = enum.verify(weights)
    except KeyError:
        raise ValueError(
            f"--init torchvision:{name}:{weights}: unknown weights; available: {list(enum.__members__)} "
            "(or the path of a weights file)"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(chosen.url)
    if not cached.is_file() and not download:
        raise FileNotFoundError(
            f"torchvision weights {chosen} are not in the local cache {str(cached)!r}. On a machine with a "
            f'network, fetch them with `python -c "import torchvision; torchvision.models.{name}'
            f"(weights='{chosen.name}')\"` and copy the file there (or set TORCH_HOME), pass the file's "
            f"path instead (torchvision:{name}:PATH), or pass download=True."
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


def _efficientnet_lite_model(name: str, path: str | None) -> torch.nn.Module:
    if name not in EFFICIENTNET_LITE_MODELS:
        raise ValueError(f"--init efficientnet_lite:{name}: unknown model; supported: {list(EFFICIENTNET_LITE_MODELS)}")
    package = efficientnet_lite_package()
    state = _tensor_state(path, f"{name} weights") if path is not None else None
    classes = _classes_in(state, "_fc.weight") if state is not None else 1000
    # image_size=None: TensorFlow-SAME padding computed per input, which the supernet reproduces at every resolution.
    model = package.EfficientNet.from_name(name, num_classes=classes, image_size=None)
    if state is not None:
        load_exactly(model, state, f"{path!r} vs {name}")
    return model.eval()
