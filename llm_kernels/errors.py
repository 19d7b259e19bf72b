"""The errors a user sees, in one module so every layer can raise them without importing
another layer: the CLI turns each into ``error: <message>`` and exit code 2, the server
(later) into a 4xx. Every message names the field, tensor or option and the expected value.
"""

from __future__ import annotations

__all__ = ["ConfigError", "CheckpointError", "CacheOverflowError", "TokenizerError", "OutputDirError"]


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent. The message
    names the file (when there is one) and the field."""


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, malformed or fails validation.

    The message names the tensor (canonical name, plus the name stored in the file when it
    differs) and the file it came from."""


class CacheOverflowError(RuntimeError):
    """A sequence would exceed its cache capacity (``max_seq_len``) or the page pool is full.
    Raised before anything is written: the caches are unchanged."""


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or a chat template fails to render. The
    message names the file (or ``chat_template``) and what was expected."""


class OutputDirError(ValueError):
    """A checkpoint writer's output folder is refused: it is (inside, or holds) the source
    checkpoint, or it is not empty and ``--force`` was not given. Raised before anything is
    written. The message names the option and both paths."""
