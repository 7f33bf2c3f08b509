"""The `serve` stage: an OpenAI-compatible API, /v1/describe, /metrics and a page to try the model.

    prodesc serve --run runs/smol        # app.serve_cli
    app = create_app(generator, cfg.serve, api_key=None)

Inside: `app` (routes, error answers, the verb), `guard` (the middleware: Host, key, body size and type),
`service` (owns the model: limits, metrics, health, page), `schemas` (reading request bodies safely, the error
type, decoding params), `batching` (the queue, the model thread, deadlines and cancellation), `static/` (the page).
"""

from prodesc.serve.app import create_app

__all__ = ["create_app"]
