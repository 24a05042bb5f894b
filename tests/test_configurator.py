import pytest

from nvfm.configurator import ConfigError, config_dict, configure


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
