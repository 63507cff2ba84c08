"""`merv serve`: an OpenAI-compatible chat-completions server for a MERV model.

`media` turns a message's image / video parts into checked local files, `engine` batches the
requests' generations on one model thread, `app` is the FastAPI application (routes, limits,
errors, streaming).
"""

from .app import ServeConfig, create_app, serve

__all__ = ["ServeConfig", "create_app", "serve"]
