import os
import re

import pytest

from nvfm.configurator import ConfigError, close_keys, config_dict, configure, help_text, require_path


def defaults():
    return {"batch_size": 8, "lr": 3e-4, "compile": False, "name": "run", "betas": (0.9, 0.95),
            "init_from": "scratch", "opt": None}


def test_overrides_and_types(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 4\nlr = 1\nimport math\n_private = 3\n")
    g = defaults()
    changed = configure(g, [str(cfg), "--compile=true", "--name=abc", "--betas=(0.8, 0.9)", "--opt=5"],
                        verbose=False)
    assert g["batch_size"] == 4 and g["lr"] == 1.0 and isinstance(g["lr"], float)
    assert g["compile"] is True and g["name"] == "abc" and g["betas"] == (0.8, 0.9) and g["opt"] == 5
    assert set(changed) == {"batch_size", "lr", "compile", "name", "betas", "opt"}


@pytest.mark.parametrize("arg,msg", [
    ("--batchsize=3", "unknown config key 'batchsize'"),
    ("--batch_size=3.5", "expected int"),
    ("--compile=maybe", "expected a bool"),
    ("--lr=abc", "expected float"),
    ("batch_size=3", "config file not found"),
    ("--batch_size", "expected --key=value"),
])
def test_errors(arg, msg):
    with pytest.raises(ConfigError, match=msg):
        configure(defaults(), [arg], verbose=False)


def test_unknown_key_in_file(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("bach_size = 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'bach_size'"):
        configure(defaults(), [str(cfg)], verbose=False)


def test_config_dict_skips_private_and_callables():
    g = dict(defaults(), _x=1, f=print)
    assert set(config_dict(g)) == set(defaults())


def test_bare_bool_flag_and_error_hints():
    g = defaults()
    configure(g, ["--compile"], verbose=False)
    assert g["compile"] is True
    with pytest.raises(ConfigError, match="expected --key=value"):
        configure(defaults(), ["--batch_size"], verbose=False)
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_sise' \(did you mean --batch_size\?\)"):
        configure(defaults(), ["--batch_sise=3"], verbose=False)
    with pytest.raises(ConfigError, match=r"settings are given as --key=value"):
        configure(defaults(), ["data/shards"], verbose=False)


def test_close_keys_by_spelling_and_shared_words():
    keys = ["global_batch", "model_size", "lr_peak", "lr_start", "shards", "out_dir"]
    assert close_keys("batch_size", keys)[0] == "global_batch"   # the README's old example
    assert close_keys("lr_peek", keys)[0] == "lr_peak"
    assert close_keys("shard", keys) == ["shards"]
    assert close_keys("zzz", keys) == []


SCRIPT = '''"""A demo stage.

    python demo_stage.py --shards=S
"""
import os

# ----------------------------------------------------------------------------- config
shards = ""          # a shard set written by preprocess.py
steps = 100
lo, hi = 1, 2        # a range
# optimisation
lr = 3e-4            # the learning rate, which has a long comment
                     # continued on the next line
SOME_TABLE = (1, 2)  # a constant: settable but not listed
device = "cpu"
from nvfm.configurator import configure
configure(globals())
steps = steps * 2    # derived later: listed once, where it is declared
'''


def test_help_text_lists_settings_with_defaults_comments_and_groups(tmp_path):
    path = tmp_path / "demo_stage.py"
    path.write_text(SCRIPT)
    g = {"__file__": str(path), "__doc__": "A demo stage.\n\n    python demo_stage.py --shards=S\n",
         "os": os, "shards": "", "steps": 100, "lo": 1, "hi": 2, "lr": 3e-4, "SOME_TABLE": (1, 2),
         "device": "cpu", "configure": configure}
    text = help_text(g)
    lines = text.splitlines()
    assert lines[0].startswith("usage: python demo_stage.py") and "A demo stage." in text
    assert re.search(r"^  --shards='' +a shard set written by preprocess.py$", text, re.M)
    flat = re.sub(r"\s+", " ", text)  # wrapped at the terminal's width
    assert "--lr=0.0003 the learning rate, which has a long comment continued on the next line --device" in flat
    assert re.search(r"^  --lo=1 +a range$", text, re.M) and re.search(r"^  --hi=2$", text, re.M)
    assert text.count("--steps=100") == 1 and "SOME_TABLE" not in text and "--os" not in text
    order = [ln.split("=")[0].strip() for ln in lines if ln.startswith("  --")]
    assert order == ["--shards", "--steps", "--lo", "--hi", "--lr", "--device"]
    assert lines.index("config:") < lines.index("optimisation:") < next(i for i, ln in enumerate(lines) if "--lr=" in ln)
    with pytest.raises(SystemExit) as e:
        configure(dict(g), ["--steps=3", "-h"], verbose=False)
    assert e.value.code == 0


def test_require_path(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "empty").write_text("")
    (tmp_path / "d").mkdir()
    assert require_path(str(tmp_path / "f"), "--labels") == str(tmp_path / "f")
    for path, kind, msg in [("", "file", "--labels is required"), (tmp_path / "nope", "file", "nope not found"),
                            (tmp_path / "empty", "file", "empty is empty"), (tmp_path / "d", "dir", "d is empty"),
                            (tmp_path / "d", "file", "is a directory"), (tmp_path / "f", "dir", "not a directory")]:
        with pytest.raises(SystemExit, match=msg) as e:
            require_path(str(path), "--labels", kind=kind)
        assert "error: --labels" in str(e.value.code)


def test_the_config_line_never_echoes_a_salt(capsys):
    """preprocess.py / bench_public.py --salt=...: the salt keys every hashed id (anyone holding it can
    test guesses of patient ids), so the 'config:' line hides it; other settings are echoed."""
    g = {"salt": "", "hash_salt": "", "lr": 1e-3}
    changed = configure(g, ["--salt=MY-SECRET-SALT", "--hash_salt=OTHER-SECRET", "--lr=0.5"])
    out = capsys.readouterr().out
    assert changed == {"salt": "MY-SECRET-SALT", "hash_salt": "OTHER-SECRET", "lr": 0.5}
    assert "SECRET" not in out and "salt=<hidden>" in out and "lr=0.5" in out, out


@pytest.mark.parametrize("arg,key,want", [
    ("--name=1e3", "name", "1e3"),             # was refused: float 1000.0 for a str setting
    ("--name=None", "name", "None"),
    ("--name=123456", "name", "123456"),
    ("--name=1,2", "name", "1,2"),             # a comma-separated list stays the text the script splits
    ("--name=True", "name", "True"),
    ("--name='a b'", "name", "a b"),           # a quoted string is still unquoted
    ("--name=", "name", ""),
    ("--lr=-1e-4", "lr", -0.0001),
    ("--lr=2", "lr", 2.0),
    ("--batch_size=1e3", "batch_size", 1000),  # a whole number in scientific notation
    ("--batch_size=-3", "batch_size", -3),
    ("--compile=no", "compile", False),
    ("--compile=FALSE", "compile", False),
    ("--compile=0", "compile", False),
    ("--betas=[0.5, 0.6]", "betas", (0.5, 0.6)),
])
def test_values_as_a_user_types_them(arg, key, want):
    g = defaults()
    configure(g, [arg], verbose=False)
    assert g[key] == want and type(g[key]) is type(want), (g[key], want)


@pytest.mark.parametrize("arg,msg", [
    ("--batch_size=1.5e0", r"--batch_size: expected int like the default 8, got float 1.5"),
    ("--batch_size=", r"--batch_size: expected int .* got str ''"),
    ("--compile=", r"--compile: expected a bool \(true/false\), got ''"),
    ("--compile=2", r"--compile: expected a bool"),
])
def test_wrong_types_name_the_key_and_the_expected_type(arg, msg):
    with pytest.raises(ConfigError, match=msg):
        configure(defaults(), [arg], verbose=False)


def test_a_home_path_is_expanded_but_a_salt_is_not(monkeypatch, tmp_path):
    """bash leaves `--out_dir=~/runs` as typed (not an assignment): the run would write ./~/runs."""
    monkeypatch.setenv("HOME", str(tmp_path))
    g = dict(defaults(), salt="")
    configure(g, ["--name=~/runs/a b", "--salt=~/x"], verbose=False)
    assert g["name"] == os.path.join(str(tmp_path), "runs", "a b") and g["salt"] == "~/x"
    configure(g, ["--name=a~/b"], verbose=False)
    assert g["name"] == "a~/b"


def test_a_space_instead_of_equals_suggests_the_flag():
    with pytest.raises(ConfigError, match=r"got '--batch_size' \(did you mean --batch_size=5\?\)"):
        configure(defaults(), ["--batch_size", "5"], verbose=False)
    with pytest.raises(ConfigError, match=r"did you mean --salt=VALUE\?") as e:
        configure(dict(defaults(), salt=""), ["--salt", "MY-SECRET"], verbose=False)
    assert "MY-SECRET" not in str(e.value)


@pytest.mark.parametrize("text,line,msg", [
    ("batch_size = 4\nlr = (1e-3\n", 2, r"syntax error: '\(' was never closed"),
    ("batch_size = 4\n\nlr = lrate * 2\n", 3, r"NameError: name 'lrate' is not defined"),
    ("batch_size = 1 // 0\n", 1, r"ZeroDivisionError"),
    ("batch_size = 4\nlr: 1e-3\n", 2, r"'lr: 1e-3' sets nothing"),  # YAML habit: a bare annotation
    ("name: my run\n", 1, r"syntax error"),
    ("batch_size = '4'\n", None, r": batch_size: expected int like the default 8, got str '4'"),
])
def test_a_broken_config_file_is_one_error_naming_file_and_line(tmp_path, text, line, msg):
    cfg = tmp_path / "c.py"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=msg) as e:
        configure(defaults(), [str(cfg)], verbose=False)
    assert str(e.value).startswith(f"{cfg}:{line}:" if line else f"{cfg}: ")
    assert "\n" not in str(e.value)


def test_a_data_file_given_as_a_config_file_is_one_error(tmp_path):
    (tmp_path / "x.npy").write_bytes(bytes([0x93, 0x4e, 0x55, 0x4d, 0xed, 0xff]))  # was UnicodeDecodeError, exit 2
    (tmp_path / "nul.py").write_bytes(b"batch_size = 4\x00\n")
    for name, msg in (("x.npy", "not UTF-8 text"), ("nul.py", "null bytes")):
        with pytest.raises(ConfigError, match=msg) as e:
            configure(defaults(), [str(tmp_path / name)], verbose=False)
        assert str(e.value).startswith(str(tmp_path / name))


def test_a_wrong_type_never_echoes_a_salt(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("salt = 12345678\n")
    with pytest.raises(ConfigError, match="expected str") as e:
        configure({"salt": ""}, [str(cfg)], verbose=False)
    assert "12345678" not in str(e.value) and "<hidden>" in str(e.value)


def test_repeated_keys_the_last_wins_and_is_printed(capsys, tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 4\n")
    g = defaults()
    changed = configure(g, ["--batch_size=2", str(cfg), "--lr=1e-3", "--lr=2e-3"])
    assert g["batch_size"] == 4 and g["lr"] == 2e-3 and changed == {"batch_size": 4, "lr": 2e-3}
    out = capsys.readouterr().out
    assert f"config: applied {cfg}" in out and "config: batch_size=4, lr=0.002" in out, out


def test_a_bracketed_list_for_a_str_setting_is_refused_with_the_comma_form():
    with pytest.raises(ConfigError, match=r"--name: expected str .* got list \['a', 'b'\] \(a list is given "
                                          r"comma-separated: --key=a,b\)"):
        configure(defaults(), ["--name=['a', 'b']"], verbose=False)


def test_a_bool_value_after_a_space_suggests_the_flag():
    with pytest.raises(ConfigError, match=r"config file not found: false \(did you mean --compile=false\?\)"):
        configure(defaults(), ["--compile", "false"], verbose=False)


def test_a_config_file_reads_the_settings_as_they_stand(tmp_path):
    # as nanoGPT's exec in globals(): a file may build on the defaults and on an earlier file
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("batch_size = 2 * batch_size\n")
    second.write_text("batch_size = batch_size + 1\nname = name + '_ablation'\n")
    g = {"batch_size": 8, "name": "run", "layers": [1, 2], "lr": 3e-4}
    changed = configure(g, [str(first), str(second)], verbose=False)
    assert g["batch_size"] == 17 and g["name"] == "run_ablation"
    assert set(changed) == {"batch_size", "name"}   # lr and layers were only read, not set


def test_a_config_file_mutating_a_default_sets_it_on_a_copy(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("layers.append(3)\n")
    layers = [1, 2]
    g = {"layers": layers, "lr": 3e-4}
    changed = configure(g, [str(cfg)], verbose=False)
    assert g["layers"] == [1, 2, 3] and changed == {"layers": [1, 2, 3]}
    assert layers == [1, 2]   # the script's own default object is untouched


def test_a_config_file_reading_an_unknown_name_names_it(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 2 * batchsize\n")
    with pytest.raises(ConfigError, match=r"c\.py:1: NameError: name 'batchsize'"):
        configure(defaults(), [str(cfg)], verbose=False)
