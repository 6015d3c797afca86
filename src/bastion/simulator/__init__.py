"""A fake vLLM OpenAI server for tests, benchmarks and the no-GPU demo (`bastion simulate`).

Nothing in the gateway imports it: the CLI loads `app` only for `bastion simulate`.
"""
