"""pdserve's API surfaces: the OpenAI-compatible HTTP server (``serving.openai_api``),
its metrics and the ``pdserve`` command line. Torch-free: they talk to an ``EngineClient``."""
