"""Ray Serve application: OpenAI-compatible ingress, generation backend, admin routes, metrics.

`raymoe.serve.app` builds and runs it; `raymoe.serve.openai_api` holds the request and response
models (pure pydantic, shared with `raymoe.client`). Importing this package imports no Ray.
"""
