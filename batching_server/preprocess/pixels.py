"""A decoded Pillow image's pixels as a tensor, without copying them and without the GIL.

``np.asarray(image)`` goes through ``Image.tobytes``: a Python loop over 64 KB encoder chunks
that copies every pixel twice and holds the GIL throughout, time during which the event loop
cannot run (in a py-spy ``--gil`` profile of the decode threads it was the largest single
holder). Pillow (11.2 and later) exports an image's own memory through the Arrow C data
interface, whose structs are a stable ABI: reading them copies nothing.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from PIL import Image

__all__ = ["pixels_rgbx"]


class _ArrowArray(ctypes.Structure):
    pass


# The ArrowArray struct, as the Arrow C data interface specifies it.
_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

# A prototype of our own: setting restype on ctypes.pythonapi's shared function object would
# change it for every other user in the process.
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def _rgbx_buffer(image: Image.Image, array_capsule: object) -> ctypes.Array[ctypes.c_uint8] | None:
    """The 4 bytes per pixel behind an exported RGB image, if the export has the expected shape."""
    address = _capsule_pointer(array_capsule, b"arrow_array")
    if not address:
        return None
    pixels = image.width * image.height
    array = _ArrowArray.from_address(address)
    # Pillow exports RGB as a fixed-size list of 4 uint8 per pixel (the 4th is padding):
    # one child array holding every byte, in row order, from offset 0.
    if array.length != pixels or array.offset or array.n_children != 1:
        return None
    values = array.children[0].contents
    if values.length != 4 * pixels or values.offset or values.n_buffers != 2:
        return None
    data = values.buffers[1]
    if not data:
        return None
    return (ctypes.c_uint8 * (4 * pixels)).from_address(data)


def pixels_rgbx(image: Image.Image) -> tuple[torch.Tensor, object]:
    """A (1, C, H, W) uint8 channels-last tensor of an RGB image, and an owner to keep alive.

    C is 4 (RGB and one padding byte per pixel) when the tensor is a view of Pillow's own
    memory: valid only while the owner lives. Where Pillow cannot export the image (older
    Pillow, or an image over one memory block: 16 MB by Pillow's default, which decode.py
    raises to ``IMAGE_BLOCK_BYTES``) C is 3 and the tensor is a copy.
    """
    if image.mode == "RGB":
        try:
            _schema, array_capsule = image.__arrow_c_array__()
        except (AttributeError, ValueError):
            pass  # no Arrow export in this Pillow, or rows not in one block
        else:
            buffer = _rgbx_buffer(image, array_capsule)
            if buffer is not None:
                view = torch.frombuffer(buffer, dtype=torch.uint8)
                return _nchw(view, image.height, image.width, 4), array_capsule
    # np.array, not asarray: torch warns on read-only buffers. (convert() would copy an RGB
    # image once more first.)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    copied = torch.from_numpy(np.array(rgb))
    return _nchw(copied, image.height, image.width, 3), copied


def _nchw(interleaved: torch.Tensor, height: int, width: int, channels: int) -> torch.Tensor:
    # One strided view, not a chain of view/permute/unsqueeze: every torch call, and every
    # intermediate tensor freed, releases the GIL and takes it back, and each take is a
    # chance for the event loop to wait on this thread.
    return interleaved.as_strided(
        (1, channels, height, width), (height * width * channels, 1, width * channels, channels)
    )
