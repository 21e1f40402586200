"""Error types. A TokenSieveError is the user's to fix and prints as one line; anything else is a bug."""


class TokenSieveError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(TokenSieveError):
    """An invalid recipe, budget, CLI flag or build spec."""


class ModelError(TokenSieveError):
    """The model cannot be loaded or has an unsupported structure."""


class ExportError(TokenSieveError):
    """torch.export or the ONNX conversion failed."""


class PassError(TokenSieveError):
    """A graph pass cannot apply to this model."""


class TargetError(TokenSieveError):
    """A backend (ONNX Runtime, TensorRT) cannot build or run the artifact."""


class VerificationError(TokenSieveError):
    """The exported model disagrees with the eager reference."""


class InternalError(Exception):
    """A tokensieve bug: deliberately not a TokenSieveError, so it keeps its traceback."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or its type name), cut to `limit` characters."""
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:limit]
