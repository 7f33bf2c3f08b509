"""The `serve` stage: an OpenAI-compatible API, /v1/describe, /metrics and a page to try the model.

    prodesc serve --run runs/smol        # app.serve_cli
    app = create_app(generator, cfg.serve, api_key=None)

Inside: `app` (routes, middleware, error answers, the verb), `service` (owns the model: limits, metrics, page),
`schemas` (request bodies, the error type, decoding params), `batching` (the queue and the model thread),
`static/` (the page).
"""

from prodesc.serve.app import create_app

__all__ = ["create_app"]
