"""The HTTP edge: schemas, routes, the error table and the ASGI middleware."""
