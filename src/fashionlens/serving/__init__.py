"""The web service: ``fashionlens serve INDEX_DIR``.

``live`` holds the open index with its models (searches, adds and removals that keep it
consistent and durable), ``batcher`` gathers concurrent requests into model batches, ``app`` is
the FastAPI application (JSON API, images, explanations, metrics, the page in ``static/``), its
routes in ``routes/``, what they depend on in ``deps`` and the request bodies in ``forms``.
"""
