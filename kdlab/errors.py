"""Errors a user can fix. The CLI prints them as one line and exits non-zero.

Errors of the libraries underneath (Hydra's composition, a constructor that Hydra's
``instantiate`` wrapped) become one such line here, read from their exception types.
"""

from __future__ import annotations

from hydra.errors import MissingConfigException


class KdlabError(Exception):
    """Base class for user-facing errors (bad config, missing files, bad checkpoints)."""


class ConfigError(KdlabError, ValueError):
    pass


class NonFiniteLossError(KdlabError):
    pass


class TeacherLoadError(KdlabError):
    pass


def unwrap_error(e: BaseException, group: str) -> KdlabError:
    """Hydra's instantiate wraps constructor errors: return ours, or name the bad value."""
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for cause in chain:
        if isinstance(cause, KdlabError):
            return cause
    root = chain[-1]
    first = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return ConfigError(f"invalid {group} settings ({type(root).__name__}: {first}); "
                       f"check the {group.split()[0]}.* overrides against `kdlab train --help`")


def hydra_error_line(error: Exception) -> str:
    """Hydra's multi-line composition errors as one line naming the problem and the fix."""
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"unknown {group} {name!r}; available: {', '.join(error.options)}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(line.rstrip(".") for line in lines[:2])
