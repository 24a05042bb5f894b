"""nanoGPT-style configuration: module-level globals overridden by config files and --key=value.

A script declares its defaults as plain globals (one per line, a comment saying what it is),
then calls

    from nvfm.configurator import configure
    configure(globals())

Each command-line argument is either a path to a Python config file (a bare argument
without "--", e.g. `config/jepa_tiny.py`; a name without a path is looked up in config/)
whose top-level assignments override the globals, or `--key=value`. Values are parsed with
`ast.literal_eval` (falling back to the raw string) and must have the type of the default:
an int default accepts an int (or a whole float: 1e5), a float default accepts an int or a
float, a str default takes the text as typed (`--out_dir=1e3` is the str '1e3'; a leading `~/`
is the home directory, which the shell does not expand after `=`), a bool default accepts
True/False/true/false/yes/no/1/0 (a bare `--flag` means True), a list or tuple default
accepts a list or tuple: when the default's items share one type, comma-separated items that
follow these rules for that type (`--seeds=0,1`, one item `--seeds=0`, `--names=T1,FLAIR`) or a
bracketed literal (`--seeds=[0, 1]`); a None default accepts anything. Unknown keys are errors:
a typo never silently does nothing. A config file that fails (syntax error, exception, a
YAML-style `key: value` line) is one error naming its line; one that cannot be read (a
directory, no permission) is one error naming it.

`-h` / `--help` prints the script's docstring and every setting with its default and its
comment, grouped as in the script (read from the script's source), then exits 0.

Called from a script (argv=None), a user error (unknown key, wrong type, missing config
file) exits with status 1 and one line on stderr naming the key and its closest matches;
a FileNotFoundError that escapes the script is also one line (NVFM_TRACEBACK=1 shows the
traceback). Any other uncaught exception is a bug: its traceback, then exit status 2. `fail` and `require_path` give scripts the same one-line errors for their inputs.
Called with an explicit argv (tests, libraries), errors raise ConfigError.
"""
import ast
import copy
import difflib
import glob
import io
import os
import re
import shutil
import sys
import textwrap
import tokenize
import traceback

_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
    pass


def _prog():
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "") or "nvfm"
    return os.path.basename(path)


def fail(msg):
    """Stop the script with a one-line user error on stderr and exit status 1."""
    raise SystemExit(f"{_prog()}: error: {msg}")


def require_path(path, what, kind="file", nonempty=True, hint=""):
    """fail() unless path is an existing file (kind="file") or directory (kind="dir"), and,
    with nonempty, a file has bytes / a directory has entries. what names the setting, e.g.
    "--labels"; hint is appended (e.g. "run preprocess.py first")."""
    tail = f" ({hint})" if hint else ""
    if not path:
        fail(f"{what} is required{tail}")
    if not os.path.exists(path):
        fail(f"{what}: {path} not found{tail}")
    if kind == "dir" and not os.path.isdir(path):
        fail(f"{what}: {path} is not a directory{tail}")
    if kind == "file" and os.path.isdir(path):
        fail(f"{what}: {path} is a directory, expected a file{tail}")
    if nonempty and (os.path.getsize(path) == 0 if kind == "file" else not os.listdir(path)):
        fail(f"{what}: {path} is empty{tail}")
    return path


def _secret(key):
    """A salt keys the hashed study / subject ids: never echoed (logs are kept and shared)."""
    return key == "salt" or key.endswith("_salt")


def _coerce(key, value, default, name=None):
    """Return value converted to the type of default, or raise ConfigError; name says where the
    value came from in the error (default "--key")."""
    name = name or f"--{key}"
    shown = "<hidden>" if _secret(key) else repr(value)
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(value).lower()]
        raise ConfigError(f"{name}: expected a bool (true/false), got {shown}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(default) is int and type(value) is float and value.is_integer():
        return int(value)  # --max_steps=1e5: scientific notation of a whole number
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        # items follow the default's items when those share one plain type: --seeds=0.5,1 for (0, 1, 2)
        # was kept as given (a script's int(s) then ran seed 0), --betas=1,2 for floats stayed ints
        kinds = {type(v) for v in default}
        if len(kinds) == 1 and next(iter(kinds)) in (bool, int, float, str):
            item = default[0]
            value = [_coerce(key, v, item, f"{name} item {i + 1}") for i, v in enumerate(value)]
        return type(default)(value)
    if isinstance(default, str) and isinstance(value, str) and (value == "~" or value.startswith("~/")) \
            and not _secret(key):
        return os.path.expanduser(value)  # the shell leaves --out_dir=~/runs alone: ./~ was never meant
    if not isinstance(value, type(default)) or (isinstance(value, bool) and not isinstance(default, bool)):
        hint = " (a list is given comma-separated: --key=a,b)" if isinstance(default, str) and \
            isinstance(value, (list, tuple, set, dict)) else ""
        if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple, set, dict)) \
                and name == f"--{key}":
            hint = f" (a list is given comma-separated: --{key}=a,b; one item: --{key}=a,)"
        raise ConfigError(f"{name}: expected {type(default).__name__} like the default {default!r}, "
                          f"got {type(value).__name__} {shown}{hint}")
    return value


def _parse_value(text, default):
    """The value of --key=text: a Python literal, or the text itself; a str setting takes the text
    as typed unless it is a quoted string (--out_dir=1e3, --salt=123456, --split=None stay text).
    A list setting whose default items share one plain type takes unbracketed text as comma-separated
    items, each parsed as a setting of that type (--names=T1,FLAIR; --names=1,2 is ['1', '2'] for str
    items; --flags=true,no; a trailing comma ends a one-item list: --seeds=3,)."""
    if isinstance(default, (list, tuple)) and default and len({type(v) for v in default}) == 1 \
            and type(default[0]) in (bool, int, float, str) and not text.lstrip().startswith(("[", "(")):
        parts = text.split(",") if text.strip() else []
        if len(parts) > 1 and not parts[-1].strip():
            parts = parts[:-1]
        return [_parse_value(part.strip() if not isinstance(default[0], str) else part, default[0])
                for part in parts]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # a plain string such as a path
    if isinstance(default, str) and not isinstance(value, str) and not text.lstrip().startswith(("[", "(", "{")):
        return text
    return value  # a bracketed list for a str setting is refused below: its items are given comma-separated


def _config_file(arg):
    if os.path.exists(arg):
        return arg
    here = os.path.join(_ROOT, "config", arg)
    for cand in (here, here + ".py"):
        if os.path.exists(cand):
            return cand
    hint = " (settings are given as --key=value)" if not arg.endswith(".py") else ""
    raise ConfigError(f"config file not found: {arg}{hint}")


def read_config_file(arg, current=None):
    """(path, {key: value}) of what a config file sets (private names, modules and callables left
    out); arg is a path or a name looked up in config/. current: the script's settings as they stand
    ({key: value}); the file runs with copies of them in scope, as nanoGPT's exec in globals() does,
    so `max_steps = 2 * max_steps` or `layers.append(4)` work, and only what it assigns or changes
    is returned."""
    path = _config_file(arg)
    try:
        with open(path, "rb") as f:
            src = f.read().decode("utf-8")
        tree = ast.parse(src, path)
    except OSError as e:  # a directory (a data folder given bare) or an unreadable file: not a traceback
        raise ConfigError(f"{path}: cannot read it as a config file: {e.strerror or e}")
    except (UnicodeDecodeError, SyntaxError) as e:  # e.g. a data file given where a config file goes
        where = f"{path}:{e.lineno}" if getattr(e, "lineno", None) else path
        why = f"syntax error: {e.msg}" if isinstance(e, SyntaxError) else "not UTF-8 text"
        raise ConfigError(f"{where}: {why} (a config file is Python: key = value)")
    for node in tree.body:  # `max_steps: 10` (YAML habit) is a bare annotation: it would set nothing
        if isinstance(node, ast.AnnAssign) and node.value is None:
            raise ConfigError(f"{path}:{node.lineno}: {ast.get_source_segment(src, node)!r} sets nothing "
                              "(a config file is Python: key = value)")
    current = current or {}
    scope, before = copy.deepcopy(current), copy.deepcopy(current)   # the file must not mutate the script's own
    try:
        exec(compile(tree, path, "exec"), scope)
    except Exception as e:  # the user's file failed, not nvfm: its line and the reason
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise ConfigError(f"{path}:{line}: {type(e).__name__}: {e}") from e
    return path, {k: v for k, v in scope.items()
                  if not k.startswith("_") and type(v).__name__ != "module" and not callable(v)
                  and (k not in before or not _same(v, before[k]))}


def _same(a, b):
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:   # e.g. an array's ambiguous truth value: taken as set by the file
        return False


def _settable(g):
    return {k for k, v in g.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module"}


def close_keys(key, keys, n=3):
    """The keys a mistyped key most likely meant: similar spelling, or sharing a word
    (batch_size -> global_batch), best first."""
    keys = sorted(keys)
    score = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in keys}
    words = {w for w in key.lower().split("_") if len(w) >= 3}
    shared = {k: max((len(w) for w in words & set(k.lower().split("_"))), default=0) for k in keys}
    cands = [k for k in keys if score[k] >= 0.6 or shared[k]]
    return sorted(cands, key=lambda k: -(score[k] + 0.1 * shared[k]))[:n]


def _unknown(key, settable, where=""):
    close = close_keys(key, settable)
    hint = f" (did you mean {' or '.join('--' + k for k in close)}?)" if close else ""
    return ConfigError(f"{where}unknown config key {key!r}{hint}")


def configure(g, argv=None, verbose=True):
    """Apply config files and --key=value overrides in argv (default sys.argv[1:]) to dict g.

    Only keys already in g that are not private, modules, functions or classes can be set.
    Returns the dict of keys that were overridden. -h/--help prints help_text(g) and exits 0.
    With argv=None (a script's command line) user errors exit 1 with one line on stderr;
    with an explicit argv they raise ConfigError.
    """
    script = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(g))
        raise SystemExit(0)
    if script:
        _install_excepthook()
        try:
            return _apply(g, argv, verbose)
        except ConfigError as e:
            fail(f"{e}; --help lists the settings")
    return _apply(g, argv, verbose)


def _apply(g, argv, verbose):
    settable = _settable(g)
    changed = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            prev = argv[i - 1] if i else ""
            if prev.startswith("--") and "=" not in prev and not os.path.exists(arg):  # `--compile false`
                key = prev[2:].replace("-", "_")
                if isinstance(g.get(key), bool) and arg.lower() in _BOOL_WORDS:
                    raise ConfigError(f"config file not found: {arg} (did you mean {prev}={arg}?)")
            path, values = read_config_file(arg, {k: g[k] for k in settable})
            for key, value in values.items():
                if key not in settable:
                    raise _unknown(key, settable, f"{path}: ")
                g[key] = changed[key] = _coerce(key, value, g[key], f"{path}: {key}")
            if verbose:
                print(f"config: applied {path}")
            continue
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in settable:
            raise _unknown(key, settable)
        if not eq:
            if not isinstance(g[key], bool):
                nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
                hint = f" (did you mean --{key}={'VALUE' if _secret(key) else nxt}?)" if nxt else ""
                raise ConfigError(f"expected --key=value, got {arg!r}{hint}")
            text = "True"  # a bare bool flag
        g[key] = changed[key] = _coerce(key, _parse_value(text, g[key]), g[key])
    if verbose and changed:
        print("config: " + ", ".join(f"{k}=<hidden>" if _secret(k) else f"{k}={v!r}"
                                     for k, v in changed.items()))
    return changed


def config_dict(g):
    """The settable globals of a script as a plain dict (stored in checkpoints and logs)."""
    return {k: v for k, v in g.items() if not k.startswith("_") and not callable(v)
            and type(v).__name__ != "module" and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


# ----------------------------------------------------------------------------- errors of a script run
BUG_EXIT_STATUS = 2  # an uncaught exception that is not a user error
_USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _excepthook(etype, value, tb):
    """Exit status 0 success, 1 user error, 2 bug: a missing input file is one line and status 1
    (its traceback with NVFM_TRACEBACK=1); any other uncaught exception is a bug: its traceback,
    then status 2. Ctrl-C keeps Python's own handling."""
    user = issubclass(etype, _USER_OS_ERRORS)
    if user and not os.environ.get("NVFM_TRACEBACK"):
        what = value.strerror or str(value)
        name = f": {value.filename}" if value.filename else ""
        print(f"{_prog()}: error: {what}{name} (NVFM_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return
    sys.__excepthook__(etype, value, tb)
    if user or issubclass(etype, KeyboardInterrupt):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not hide the exit status
            pass
    raise SystemExit(BUG_EXIT_STATUS)


def _install_excepthook():
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook


# ----------------------------------------------------------------------------- --help
def _source_layout(path, keys):
    """[("group", title) | ("key", name, comment)] for the top-level assignments of keys in the
    script at path, in source order; a group is a comment line at column 0 just above a setting,
    a setting's comment is its trailing comment plus indented comment lines right below it."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    comments = {}  # line -> (column, text)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    lines = src.splitlines()
    out, prev_end, seen = [], 0, set()
    for node in ast.parse(src).body:
        names = []
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
                names += [e.id for e in elts if isinstance(e, ast.Name) and e.id in keys and e.id not in seen]
        seen.update(names)  # a setting reassigned further down is listed where it is declared
        if names:
            for ln in range(node.lineno - 1, prev_end, -1):  # the nearest column-0 comment above
                if ln in comments and comments[ln][0] == 0 and lines[ln - 1].lstrip().startswith("#"):
                    title = comments[ln][1].strip("-= ").strip()
                    out.append(("group", title))
                    break
                if lines[ln - 1].strip() and not lines[ln - 1].lstrip().startswith("#"):
                    break
            text = [comments[ln][1] for ln in range(node.lineno, node.end_lineno + 1)
                    if ln in comments and not lines[ln - 1].lstrip().startswith("#")]
            ln = node.end_lineno + 1
            while ln in comments and comments[ln][0] > 0 and lines[ln - 1].lstrip().startswith("#"):
                text.append(comments[ln][1])
                ln += 1
            for i, name in enumerate(names):
                out.append(("key", name, " ".join(text) if i == 0 else ""))
        prev_end = node.end_lineno
    return out


def _show(value):
    if isinstance(value, str):
        return value if value and value.strip() == value else repr(value)
    return repr(value)


def _config_files(current):
    """[(config/NAME.py, first comment line)] of the config files whose keys this script has;
    current: the script's settings {key: value}."""
    out, settable = [], set(current)
    for path in sorted(glob.glob(os.path.join(_ROOT, "config", "*.py"))):
        try:
            _, values = read_config_file(path, current)
        except Exception:  # a broken config file must not break --help
            continue
        if values and set(values) <= settable:
            head = []
            with open(path) as f:
                for line in f:
                    if not line.startswith("#"):
                        break
                    head.append(line.lstrip("# ").strip())
            first = re.split(r"(?<=[.;])\s", " ".join(head))[0].rstrip(".;")  # its first sentence
            out.append((os.path.relpath(path, _ROOT), first))
    return out


def help_text(g):
    """The script's usage, docstring and settings (default and comment each, grouped as in the
    script's source), as printed by --help."""
    settable = _settable(g)
    shown = {k for k in settable if not k.isupper()}  # CONSTANTS stay settable but are not settings
    path = g.get("__file__")
    spec = g.get("__spec__")  # run as `python -m nvfm.x`: its module name, not the file's
    if spec is not None and spec.name.startswith("nvfm."):
        prog = f"-m {spec.name}"
    else:
        prog = os.path.basename(path) if path else _prog()
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    parts = [f"usage: python {prog} [CONFIG.py ...] [--key=value ...]   (-h, --help: this text)"]
    doc = (g.get("__doc__") or "").strip()
    if doc:
        parts += ["", doc]
    configs = _config_files({k: g[k] for k in settable})
    if configs:
        parts += ["", "config files (a bare argument; each sets several of the settings below):"]
        for p, d in configs:
            lines = textwrap.wrap(d, width - 32) or [""]
            parts += [f"  {p:<28} {lines[0]}".rstrip()] + [" " * 31 + w for w in lines[1:]]
    parts += ["", "settings (default shown; --key=value overrides one, a bool flag alone means True):"]
    try:
        layout = _source_layout(path, shown) if path and path.endswith(".py") else []
    except (OSError, SyntaxError, ValueError):
        layout = []
    listed = {item[1] for item in layout if item[0] == "key"}
    layout += [("key", k, "") for k in g if k in shown and k not in listed]
    col = 34
    for item in layout:
        if item[0] == "group":
            parts += ["", f"{item[1]}:"] if item[1] else [""]
            continue
        _, name, comment = item
        flag = f"  --{name}={_show(g[name])}"
        if not comment:
            parts.append(flag)
            continue
        wrapped = textwrap.wrap(comment, width - col - 1) or [""]
        if len(flag) < col:
            parts.append(f"{flag:<{col}} {wrapped[0]}")
            wrapped = wrapped[1:]
        else:
            parts.append(flag)
        parts += [" " * (col + 1) + w for w in wrapped]
    return "\n".join(parts).replace("\n\n\n", "\n\n")
