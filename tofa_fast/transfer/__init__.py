"""Transfer from pretrained networks (SPEC §9): OFA MobileNetV3 checkpoints, torchvision MobileNetV3 /
MobileNetV2 and EfficientNet-Lite models become supernets whose max subnet computes what the
pretrained network computes.

>>> import tofa_fast
>>> net = tofa_fast.transfer.from_ofa(ofa_model_or_state_dict)                # doctest: +SKIP
>>> net = tofa_fast.transfer.from_torchvision(torchvision_model)              # doctest: +SKIP
>>> net = tofa_fast.transfer.from_efficientnet_lite(efficientnet_lite_model)  # doctest: +SKIP
>>> net = tofa_fast.transfer.load_init("torchvision:mobilenet_v2:mobilenet_v2-b0353104.pth", 10)  # doctest: +SKIP
"""

from .efficientnet_lite import EFFICIENTNET_LITE_MODELS, efficientnet_lite_space, from_efficientnet_lite
from .init_source import TORCHVISION_MODELS, load_init
from .mbconv_import import DEFAULT_RESOLUTIONS
from .ofa_mbv3 import OFA_WIDTH_MULTS, canonical_ofa_key, from_ofa, ofa_arch, ofa_key_map
from .state_dict_mapping import CheckpointMismatchError
from .torchvision_mbv3 import from_torchvision, torchvision_space

__all__ = [
    "DEFAULT_RESOLUTIONS",
    "EFFICIENTNET_LITE_MODELS",
    "OFA_WIDTH_MULTS",
    "TORCHVISION_MODELS",
    "CheckpointMismatchError",
    "canonical_ofa_key",
    "efficientnet_lite_space",
    "from_efficientnet_lite",
    "from_ofa",
    "from_torchvision",
    "load_init",
    "ofa_arch",
    "ofa_key_map",
    "torchvision_space",
]
