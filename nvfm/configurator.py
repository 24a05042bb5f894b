"""nanoGPT-style configuration: module-level globals overridden by config files and --key=value.

A script declares its defaults as plain globals, then calls

    from nvfm.configurator import configure
    configure(globals())

Each command-line argument is either a path to a Python config file (a bare argument
without "--", e.g. `config/jepa_tiny.py`; a name without a path is looked up in config/)
whose top-level assignments override the globals, or `--key=value`. Values are parsed with
`ast.literal_eval` (falling back to the raw string) and must have the type of the default:
an int default accepts an int, a float default accepts an int or a float, a bool default
accepts True/False/true/false/1/0, a None default accepts anything. Unknown keys are errors:
a typo never silently does nothing.
"""
import ast
import os
import sys

_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


class ConfigError(ValueError):
    pass


def _coerce(key, value, default):
    """Return value converted to the type of default, or raise ConfigError."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(value).lower()]
        raise ConfigError(f"--{key}: expected a bool (true/false), got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if not isinstance(value, type(default)) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise ConfigError(f"--{key}: expected {type(default).__name__} like the default {default!r}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain string such as a path


def _config_file(arg):
    if os.path.exists(arg):
        return arg
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", arg)
    for cand in (here, here + ".py"):
        if os.path.exists(cand):
            return cand
    raise ConfigError(f"config file not found: {arg}")


def read_config_file(arg):
    """(path, {key: value}) of a config file's top-level assignments (private names, modules and
    callables left out); arg is a path or a name looked up in config/."""
    path = _config_file(arg)
    scope = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), scope)
    return path, {k: v for k, v in scope.items()
                  if not k.startswith("_") and type(v).__name__ != "module" and not callable(v)}


def configure(g, argv=None, verbose=True):
    """Apply config files and --key=value overrides in argv (default sys.argv[1:]) to dict g.

    Only keys already in g that are not private, modules, functions or classes can be set.
    Returns the dict of keys that were overridden.
    """
    argv = sys.argv[1:] if argv is None else argv
    settable = {k for k, v in g.items() if not k.startswith("_") and not callable(v)
                and type(v).__name__ != "module"}
    changed = {}
    for arg in argv:
        if not arg.startswith("--"):
            path, values = read_config_file(arg)
            for key, value in values.items():
                if key not in settable:
                    raise ConfigError(f"{path}: unknown config key {key!r}")
                g[key] = changed[key] = _coerce(key, value, g[key])
            if verbose:
                print(f"config: applied {path}")
            continue
        if "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in settable:
            close = [k for k in sorted(settable) if k[:3] == key[:3]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        g[key] = changed[key] = _coerce(key, _parse_value(text), g[key])
    if verbose and changed:
        print("config: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    return changed


def config_dict(g):
    """The settable globals of a script as a plain dict (stored in checkpoints and logs)."""
    return {k: v for k, v in g.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module" and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
