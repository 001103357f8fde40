"""The HTTP server: FastAPI app, middleware, routes, uploads, admission. Imports neither torch nor an engine."""
