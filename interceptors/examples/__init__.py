"""Examples of the deployment's own interceptors (`server.extra_interceptors`); docs/interceptors.md."""
