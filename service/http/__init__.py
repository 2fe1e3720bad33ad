"""The HTTP transport: a BentoML service whose routes are a Starlette app (see `service.http.service`)."""
