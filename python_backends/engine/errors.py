"""The engine's errors. `InvalidRequestError` is the client's fault and safe to show them."""


class EngineError(Exception):
    """Base class for every error the engine raises on purpose."""


class InvalidRequestError(EngineError):
    """The request cannot be served as asked (bad parameter, prompt too long...)."""


class ConfigError(EngineError):
    """The engine configuration is invalid; the message names the field."""
