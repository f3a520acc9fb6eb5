"""The OpenAI-compatible server of `tinylm serve`: request shapes (protocol), Prometheus metrics, the engine's
own thread (worker), turning requests into engine work (prepare), the HTTP app (app), and routing between a
small model and a fallback (routing's signals and calibration, router's live part)."""
