"""Pipelines: per-item coroutines built on the engine's ``ask``. Each is one module and imports no backend."""
