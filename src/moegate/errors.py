"""The one error base class of the package."""

from __future__ import annotations


class MoegateError(Exception):
    """A problem the user can fix: a config key, an input file or row, a name that matches nothing.

    Its message names the file, row or key and what was expected. The ``moegate`` command line prints it
    as one line, ``error: <message>``, and exits with status 2, without a traceback; anything else that
    escapes a command is a bug and keeps its traceback. Each stage's own error subclasses this one
    (ConfigError, IngestError, ClusterError, DatasetError, LLMError).
    """
