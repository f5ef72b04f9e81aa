"""Where the default config lives, and checks that catch user mistakes before any compilation."""

import os
import sys

from tcjepa_jax import config_checks, config_fields

# configs/ is installed next to tcjepa_jax/ (see setup.py), so this holds after any install.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic_tiny.py")


class UserError(Exception):
    """A mistake the user can fix (config, data, files); reported as one message, no traceback."""


def run_command(fn, *args):
    """Runs a command-line job: user errors end it with one message and exit status 1."""
    from tcjepa_jax.metrics import quiet_library_logs
    quiet_library_logs()
    try:
        return fn(*args)
    except UserError as e:
        sys.exit(f"error: {e}")


_CONFIG_FLAG_ERRORS = (KeyError, AttributeError, ValueError, TypeError, OSError)


def _config_flag_error(e: Exception):
    message = str(e.args[0] if len(e.args) == 1 else e).strip("'\"")
    message = message.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    sys.exit(f"error: {type(e).__name__} while reading the command line's config flags: "
             f"{message}")


def define_config_flag(default: str = DEFAULT_CONFIG,
                       help_text: str = "Training config file (configs/*.py[:ARGS])."):
    """The --config flag. ml_collections loads the file and applies --config.KEY=VALUE while
    the flag is defined (at import): a file that fails to load or an override of a field that
    does not exist (`--config.model.encodr=...`, reported with a "did you mean") is one message
    and exit status 1, not a traceback."""
    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
    except _CONFIG_FLAG_ERRORS as e:
        _config_flag_error(e)


def define_config_dict_flag(name: str, default, help_text: str):
    """A --NAME.KEY=VALUE flag over the ConfigDict `default` (types and names checked against
    it; config_flags.get_override_values gives what the command line set), with the errors
    of define_config_flag."""
    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_dict(name, default, help_text)
    except _CONFIG_FLAG_ERRORS as e:
        _config_flag_error(e)


def config_value(flag):
    """The config of a define_config_flag flag; a file that failed to load is one message."""
    try:
        config = flag.value
        config.to_dict()  # a file that failed to load raises only when the config is read
        return config
    except _CONFIG_FLAG_ERRORS as e:
        _config_flag_error(e)


def parse_flags(argv):
    """absl flag parsing for commands with --config: errors of the config flags as in
    define_config_flag."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # its message may hold the traceback of a config file's error
        lines = [line for line in str(e).splitlines() if line.strip()]
        sys.exit(f"error: {lines[0]} {lines[-1].strip() if len(lines) > 1 else ''}".strip())
    except _CONFIG_FLAG_ERRORS as e:
        _config_flag_error(e)


def validate_config(config) -> None:
    """Every field of configs/common.py (config_fields.FIELDS: names, types, ranges, choices),
    then the fields against each other (config_checks.check_combinations); a ValueError that names the field
    and says what to change. Needs no devices: experiment.setup checks the mesh and the batch
    against them afterwards (config_checks.check_devices)."""
    config_fields.check_fields(config)
    config_checks.check_combinations(config)
