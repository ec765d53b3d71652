"""``ForwardPass``: one batch tensor to class probabilities, blocking, in the calling thread.

It owns how the network runs (device, precision, memory format, compiled graphs, padding to
the allowed batch shapes, a CUDA stream per thread), not which thread runs it or when: that
is the runner's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.shapes import padded_size
from .acceleration import autocast

__all__ = ["ForwardPass"]


class ForwardPass:
    """A network prepared for inference on ``device``; ``forward`` runs one batch."""

    def __init__(
        self,
        *,
        module: nn.Module,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool = False,
        batch_sizes: Sequence[int] = (),
    ) -> None:
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.compiled = False  # until use_compiled
        self.batch_sizes = tuple(batch_sizes)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # No parameter needs a gradient here. With none, autocast never fills its weight-cast
        # cache, which is global and mutex-guarded: while it holds cast weights, a thread that
        # leaves autocast (freeing them, which needs the GIL) and a thread that compiles
        # (holding the GIL, casting under that mutex) can deadlock each other (seen with two
        # model threads).
        self.module = (
            module.eval().requires_grad_(False).to(device).to(memory_format=self.memory_format)
        )
        # What runs eagerly and what compiled graphs are built from: the module, or its
        # int8 form (run_quantized).
        self.network: nn.Module = self.module
        self._run: Callable[[torch.Tensor], torch.Tensor] = self.module
        self._local = threading.local()

    def run_quantized(self, network: nn.Module) -> None:
        """Run and compile ``network``, the module's quantized form, instead of the module
        (before any compiled graphs are in use)."""
        self.network = self._run = network

    def use_compiled(self, graphs: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run ``graphs`` (compiled ahead of time for this network) instead of the module."""
        self._run = graphs
        self.compiled = True

    @property
    def parameter_bytes(self) -> int:
        """Bytes held by the network's parameters and buffers on its device."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, pixels: torch.Tensor, *, threads: int) -> torch.Tensor:
        """Class probabilities (N, classes) on the CPU for a (N, 3, H, W) batch; blocking.

        The batch is zero-padded up to the next of ``batch_sizes``, so compiled graphs see
        only the shapes warm-up compiled. It runs on ``threads`` torch threads, in whichever
        thread calls.
        """
        # Compiled graphs guard on the thread count too: the caller's must not leak in.
        previous = torch.get_num_threads()
        if previous == threads:
            return self._forward(pixels)
        torch.set_num_threads(threads)
        try:
            return self._forward(pixels)
        finally:
            torch.set_num_threads(previous)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = pixels.shape[0]
        padded = padded_size(size, self.batch_sizes)
        # Inference mode throughout: compiled graphs guard on the input's dispatch keys, and
        # a batch made outside it would miss every warm-up graph and recompile (seconds).
        with torch.inference_mode():
            if padded > size:
                padding = pixels.new_zeros(padded - size, *pixels.shape[1:])
                pixels = torch.cat([pixels, padding.contiguous(memory_format=self.memory_format)])
            if self.device.type == "cuda" and pixels.device.type == "cpu":
                # Page-locked memory lets the copy overlap with work already on the GPU.
                pixels = pixels.pin_memory()
            with self.on_stream(), autocast(self.precision, self.device):
                batch = pixels.to(self.device, non_blocking=True)
                # A no-op for the preprocessor's images, which come channels-last already.
                batch = batch.contiguous(memory_format=self.memory_format)
                if not batch.is_inference():
                    batch = batch.clone()  # only for callers outside the server
                logits = self._run(batch)[:size]
                return torch.softmax(logits.float(), dim=1).cpu()

    def on_stream(self) -> contextlib.AbstractContextManager[Any]:
        """The calling model thread's own CUDA stream as the current one (on a CPU: nothing).

        A stream per model thread lets one batch's copy run beside another's kernels: on the
        shared default stream, two model threads only queue behind each other. Work on a
        batch before its pass (the device's decodes) runs on it too, so the pass sees it done.
        """
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(self._thread_stream())

    def _thread_stream(self) -> torch.cuda.Stream:
        stream: torch.cuda.Stream | None = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        return stream

    def stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One batch of (3, H, W) images, in the model's memory layout.

        Images on the CPU make a batch on the CPU (the pass copies it over); where any image
        is on the model's device already (decoded there), the batch is made there.
        """
        with torch.inference_mode():
            if any(image.device != images[0].device for image in images):
                images = [image.to(self.device) for image in images]
            if len(images) == 1:
                # A lone image needs no copy when it is in the model's layout already (the
                # preprocessor's are): a batch of one is a view of it. Its batch stride is the
                # image's size, as a stacked batch's is: compiled graphs guard on every
                # stride, even of a dimension of size 1 (unsqueeze's would recompile).
                image = images[0]
                single = image.as_strided(
                    (1, *image.shape), (image.numel(), *image.stride()), image.storage_offset()
                )
                if single.is_contiguous(memory_format=self.memory_format):
                    return single
            # Stacked straight into the model's layout: the preprocessor's images are
            # channels-last already, so this is the only copy.
            batch = torch.empty(
                (len(images), *images[0].shape),
                device=images[0].device,
                memory_format=self.memory_format,
            )
            return torch.stack(images, out=batch)
