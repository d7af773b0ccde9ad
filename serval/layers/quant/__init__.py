"""Quantization formats on the linear layer (serval.layers.linear.Linear.quant_method): each format is an object
that creates, loads and applies its weights (base.QuantMethod); config.parse reads a checkpoint's
quantization_config into the format of every layer. The model files never see which format runs."""
from serval.layers.quant.base import QuantMethod
from serval.layers.quant.config import CheckpointQuantization, parse
from serval.layers.quant.fp8 import BlockFp8Method, Fp8Method
from serval.layers.quant.int8 import Int8Method
from serval.layers.quant.w4a16 import W4A16Method

__all__ = ["QuantMethod", "CheckpointQuantization", "parse", "Fp8Method", "BlockFp8Method", "Int8Method",
           "W4A16Method"]
