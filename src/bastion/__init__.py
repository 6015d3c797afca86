"""bastion: an authenticating, rate-limiting OpenAI-compatible gateway for a self-hosted vLLM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bastion")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
