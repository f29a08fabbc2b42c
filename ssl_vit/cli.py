"""Exit codes of the command-line apps: a configuration that cannot run exits with 2 and a
message naming the key (no traceback); anything else keeps Hydra's behaviour.

Hydra reports what it refuses itself (an unknown group option, an override of a key the schema
does not have, a value of the wrong type) and exits with 1 before the app's function starts;
:func:`run_app` turns that into 2. The app's own configuration checks raise
:class:`ssl_vit.schema.ConfigError`, which :func:`config_errors_exit` prints and turns into 2.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

from ssl_vit.schema import ConfigError

CONFIG_ERROR_EXIT_CODE = 2
_started = False


def exit_2_on(*errors: type[BaseException]) -> Callable[[Callable], Callable]:
    """Decorate a Hydra task function: the given errors print ``error: ...`` and exit 2 (the
    tools whose every ValueError is about their input use ``exit_2_on(ValueError)``)."""

    def decorate(task: Callable) -> Callable:
        @functools.wraps(task)
        def wrapper(*args, **kwargs):
            global _started
            _started = True
            try:
                return task(*args, **kwargs)
            except errors as error:
                print(f"error: {error}", file=sys.stderr)
                sys.exit(CONFIG_ERROR_EXIT_CODE)

        return wrapper

    return decorate


# Training: only configuration errors (found before any step); a ValueError during training is a
# bug to show with its traceback.
config_errors_exit = exit_2_on(ConfigError)


def run_app(hydra_main: Callable[[], None]) -> None:
    """Call a ``@hydra.main`` function; Hydra's own refusal of the command line exits 2."""
    try:
        hydra_main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _started:
            raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
        raise
