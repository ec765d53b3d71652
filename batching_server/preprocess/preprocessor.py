"""``Preprocessor``: uploaded bytes to the normalised tensor the model's weights expect."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from .decode import DRAFT_MARGIN, decode_image, limit_aspect
from .transforms import fast_transform

__all__ = ["Preprocessor"]


class Preprocessor:
    """Turns uploaded bytes into the (3, H, W) tensor that ``transform`` defines.

    ``transform`` is the weights' own (torchvision's ``weights.transforms()``); where it is
    the usual resize-crop-normalise, a faster twin runs instead (``fast_resize``).
    """

    def __init__(
        self,
        *,
        transform: nn.Module,
        max_image_pixels: int,
        jpeg_draft: bool = True,
        fast_resize: bool = True,
    ) -> None:
        self.transform = transform
        self.max_image_pixels = max_image_pixels
        resize_size: list[int] = getattr(transform, "resize_size", [])
        self.draft_size = (
            round(resize_size[0] * DRAFT_MARGIN) if jpeg_draft and resize_size else None
        )
        self._fast = fast_transform(transform) if fast_resize else None

    def decode(self, data: bytes) -> Image.Image:
        """Decode to an upright RGB image, enforcing the pixel limit before decoding."""
        return decode_image(
            data, max_image_pixels=self.max_image_pixels, draft_size=self.draft_size
        )

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """The model input for a decoded RGB image."""
        image = limit_aspect(image)
        # An inference tensor, as the model's batches are: a lone image then goes to the
        # model as it is, with no copy (a normal tensor would be copied into one).
        with torch.inference_mode():
            if self._fast is not None:
                return self._fast(image)
            tensor: torch.Tensor = self.transform(image)
            return tensor

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode and transform; raises ``BadImageError`` or ``ImageTooLargeError``."""
        return self.to_tensor(self.decode(data))
