"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""


class KdlabError(Exception):
    """Base class for user-facing errors (bad config, missing files, bad checkpoints)."""


class ConfigError(KdlabError, ValueError):
    pass


class NonFiniteLossError(KdlabError):
    pass


class TeacherLoadError(KdlabError):
    pass
