"""HTTP layer: OpenAI-compatible API over the engine (`create_app`), metrics, and the `fbserve` CLI."""
