"""The HTTP layer: app wiring, routes with their policy, middlewares, uploads and responses."""

from .app import create_app, create_metrics_app
from .routes import Route, RouteTable

__all__ = ["Route", "RouteTable", "create_app", "create_metrics_app"]
