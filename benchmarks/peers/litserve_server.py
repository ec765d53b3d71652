"""LitServe with the shared model code: dynamic batching by LitServe, one worker.

No ``from __future__ import annotations`` here: LitServe reads ``decode_request``'s
annotation at run time, and only the ``Request`` class itself makes it parse a form.
"""

import argparse
from typing import Any

import litserve as ls
import torch
from fastapi import Request

from benchmarks.peers.model_code import PeerModel


class ResNetAPI(ls.LitAPI):  # type: ignore[misc]
    """Decode and transform per request, one forward pass per LitServe batch."""

    def __init__(self, *, compile: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compile = compile

    def setup(self, device: str) -> None:
        self.model = PeerModel(
            compile=self.compile, batch_sizes=(1, 2, 4, 8) if self.compile else ()
        )

    def decode_request(self, request: Request) -> torch.Tensor:
        form: Any = request  # LitServe hands over the parsed multipart form
        return self.model.preprocess(form["file"].file.read())

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return PeerModel.answer(output)


def main() -> None:
    """Serve on 127.0.0.1:``--port`` until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    api = ResNetAPI(compile=args.compile, max_batch_size=8, batch_timeout=0.01)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
