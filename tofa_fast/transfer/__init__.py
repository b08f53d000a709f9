"""Transfer from pretrained networks (SPEC §9): OFA MobileNetV3 checkpoints and torchvision
MobileNetV3 models become supernets whose max subnet computes what the pretrained network computes.

>>> import tofa_fast
>>> net = tofa_fast.transfer.from_ofa(ofa_model_or_state_dict)           # doctest: +SKIP
>>> net = tofa_fast.transfer.from_torchvision(torchvision_model)         # doctest: +SKIP
>>> net = tofa_fast.transfer.load_init("ofa:/path/ofa_mbv3.pth", 10)    # doctest: +SKIP
"""

from .init_source import TORCHVISION_MODELS, load_init
from .ofa_mbv3 import OFA_WIDTH_MULTS, canonical_ofa_key, from_ofa, ofa_arch, ofa_key_map
from .state_dict_mapping import CheckpointMismatchError
from .torchvision_mbv3 import from_torchvision, torchvision_space

__all__ = [
    "OFA_WIDTH_MULTS",
    "TORCHVISION_MODELS",
    "CheckpointMismatchError",
    "canonical_ofa_key",
    "from_ofa",
    "from_torchvision",
    "load_init",
    "ofa_arch",
    "ofa_key_map",
    "torchvision_space",
]
