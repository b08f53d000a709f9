"""Elastic neural-network modules (SPEC §3): the supernet, its layers and extracted subnets."""

from .bn_calibration import recalibrate_bn
from .elastic_batchnorm import ElasticBatchNorm2d
from .elastic_conv import ElasticConv2d, ElasticLinear
from .elastic_dwconv import ElasticDepthwiseConv2d
from .elastic_se import ElasticSqueezeExcite, SqueezeExcite
from .mbconv import ElasticMBConv, MBConvBlock
from .supernet import Subnet, Supernet

__all__ = [
    "ElasticBatchNorm2d",
    "ElasticConv2d",
    "ElasticDepthwiseConv2d",
    "ElasticLinear",
    "ElasticMBConv",
    "ElasticSqueezeExcite",
    "MBConvBlock",
    "SqueezeExcite",
    "Subnet",
    "Supernet",
    "recalibrate_bn",
]
