"""Peers side by side: LitServe and a naive FastAPI server with the same model code as ours."""
