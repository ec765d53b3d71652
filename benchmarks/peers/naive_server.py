"""The seed's naive design with the shared model code: FastAPI, one image per forward pass, run
in the handler (no batching, no thread of its own)."""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from fastapi import FastAPI, File

from benchmarks.peers.model_code import PeerModel

app = FastAPI()
model = PeerModel()


@app.get("/health")
def health() -> dict[str, str]:
    """Always up once the model has loaded."""
    return {"status": "ok"}


@app.post("/predict")
def predict(file: bytes = File(...)) -> dict[str, Any]:
    """Decode, transform and classify one image (FastAPI runs sync handlers in a thread pool)."""
    probabilities = model.forward(model.preprocess(file)[None])
    return PeerModel.answer(probabilities[0])


def main() -> None:
    """Serve on 127.0.0.1:``--port`` until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
