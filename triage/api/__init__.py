"""The HTTP server: one FastAPI app, one router per resource."""
