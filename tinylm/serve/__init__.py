"""The OpenAI-compatible server of `tinylm serve`: request shapes (protocol), Prometheus metrics, the engine's
own thread (worker), turning requests into engine work (prepare), and the HTTP app (app)."""
