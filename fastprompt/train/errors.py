"""The harness's error for a run that cannot be done as asked (its own module, so that the configuration and
its checks, which both raise it, import neither each other in a circle)."""


class ConfigError(ValueError):
    """A run that cannot be done as asked (an unknown method or option, a resume with other settings, a folder
    that is not a run); the message says what and how to fix it. `fastprompt` prints it as one line."""
