"""``Preprocessor``: uploaded bytes to the normalised tensor the model's weights expect."""

from __future__ import annotations

import time

import torch
from PIL import Image
from torch import nn

from ..core.errors import DeadlineExceededError
from .budget import PixelBudget
from .decode import DRAFT_MARGIN, apply_draft, decode_image, limit_aspect, load_rgb, open_image
from .encoded import EncodedJpeg, encoded_jpeg
from .transforms import fast_transform

__all__ = ["Preprocessor"]


class Preprocessor:
    """Turns uploaded bytes into the (3, H, W) tensor that ``transform`` defines.

    ``transform`` is the weights' own (torchvision's ``weights.transforms()``); where it is
    the usual resize-crop-normalise, a faster twin runs instead (``fast_resize``). Its calls
    share a budget of ``max_pixels_in_flight`` decoded pixels (None: no budget). With
    ``keep_jpegs_encoded`` (``preprocess.device = model``), a JPEG the device decoder takes
    is only checked, and returned still encoded, for the model's device to decode.
    """

    def __init__(
        self,
        *,
        transform: nn.Module,
        max_image_pixels: int,
        jpeg_draft: bool = True,
        fast_resize: bool = True,
        max_pixels_in_flight: int | None = None,
        keep_jpegs_encoded: bool = False,
    ) -> None:
        self.transform = transform
        self.keep_jpegs_encoded = keep_jpegs_encoded
        self.max_image_pixels = max_image_pixels
        self.budget = PixelBudget(max_pixels_in_flight) if max_pixels_in_flight else None
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

    def prepare(self, data: bytes, *, deadline: float | None = None) -> torch.Tensor | EncodedJpeg:
        """The model input: with ``keep_jpegs_encoded``, a JPEG the device decoder takes comes
        back checked (header, pixel limit, EXIF orientation) and still encoded; anything else
        as ``__call__`` makes it."""
        if not self.keep_jpegs_encoded:
            return self(data, deadline=deadline)
        # Opened without the draft, which would shrink the size the device must decode.
        image = open_image(data, max_image_pixels=self.max_image_pixels, draft_size=None)
        encoded = encoded_jpeg(image, data)
        if encoded is not None:
            image.close()
            return encoded
        if self.draft_size is not None:
            apply_draft(image, self.draft_size)
        return self._budgeted(image, deadline)

    def __call__(self, data: bytes, *, deadline: float | None = None) -> torch.Tensor:
        """Decode and transform; raises ``BadImageError`` or ``ImageTooLargeError``, and
        ``DeadlineExceededError`` when ``deadline`` (``time.monotonic()``) passes while the
        image waits for its share of the pixel budget."""
        image = open_image(data, max_image_pixels=self.max_image_pixels, draft_size=self.draft_size)
        return self._budgeted(image, deadline)

    def _budgeted(self, image: Image.Image, deadline: float | None) -> torch.Tensor:
        if self.budget is None:
            return self._tensor(image)
        timeout_s = None if deadline is None else deadline - time.monotonic()
        # Taken from the header's size (after the JPEG draft: what will really be decoded),
        # before any pixel is, and held until the full-size pixels are freed.
        try:
            taken = self.budget.acquire(image.width * image.height, timeout_s=timeout_s)
        except TimeoutError:
            image.close()
            raise DeadlineExceededError(
                "the request deadline passed while the image waited for decode memory "
                "(limits.max_decode_pixels_in_flight)"
            ) from None
        try:
            return self._tensor(image)
        finally:
            self.budget.release(taken)

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        try:
            rgb = load_rgb(image)
            try:
                return self.to_tensor(rgb)
            finally:
                rgb.close()
        finally:
            # Now, not whenever the last reference goes: the budget counts these pixels free.
            image.close()
