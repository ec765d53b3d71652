"""Uploaded bytes to model input: format sniffing, limits, decode, EXIF, transforms."""

from .decode import ACCEPTED_FORMATS, decode_image
from .encoded import EncodedJpeg, encoded_jpeg
from .pool import Decoded, DecodePool
from .preprocessor import Preprocessor
from .tensors import pixels_from_values
from .transforms import FastTransform, fast_transform

__all__ = [
    "ACCEPTED_FORMATS",
    "DecodePool",
    "Decoded",
    "EncodedJpeg",
    "FastTransform",
    "Preprocessor",
    "decode_image",
    "encoded_jpeg",
    "fast_transform",
    "pixels_from_values",
]
