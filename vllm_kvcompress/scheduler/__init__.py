"""EngineCore side: who is admitted, which head-blocks each request gets, when
to compress, and what comes back. Never imported by the worker."""
