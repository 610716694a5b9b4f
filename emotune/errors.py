"""The one exception type users see. The CLI prints its message without a traceback and exits 2."""


class EmotuneError(Exception):
    """A problem the user can fix: the message says what, where and what to do."""


class DataError(EmotuneError, ValueError):
    """A corpus, dataset, scenario or basis file is malformed."""


class ConfigError(EmotuneError, ValueError):
    """A recipe, flag or argument is wrong."""
