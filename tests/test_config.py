"""The config files and the CLI contract: overrides, typed keys, one-line errors."""

import pathlib
import re
import subprocess
import sys

import pytest

from imgclf_jax import cli, config as config_lib
from imgclf_jax.data import builders
from imgclf_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ["ml1", "ml2", "ml4", "ml5", "ml6", "digits", "folders"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_validates_and_documents_itself(name):
    path = ROOT / "configs" / f"{name}.py"
    args = cli.parse_args(["--config", str(path)])
    assert args.workdir == f"runs/{name}"
    text = path.read_text()
    assert text.startswith('"""') and "python -m imgclf_jax.train --config configs/" in text
    for key in ("data.dir", "data.cache_dir", "data.max_train_examples", "data.max_val_examples",
                "train.num_epochs", "train.batch_size", "seed"):
        assert key in set(config_lib.leaf_keys(args.config))


def test_reference_recipes():
    ml4 = cli.parse_args(["--config", str(ROOT / "configs/ml4.py")]).config
    assert ml4.data.class_repeats == (2, 2, 2, 2, 3)
    assert ml4.optimizer.decay_rate == 1.5 and ml4.optimizer.decay_steps == 10000
    ml6 = cli.parse_args(["--config", str(ROOT / "configs/ml6.py")]).config
    assert ml6.data.class_repeats == (2, 2, 2, 2, 2)
    assert (ml6.augment.rotation_deg, ml6.augment.shift_fraction, ml6.augment.zoom_fraction) == (20, 0.2, 0.3)
    assert ml6.model.conv_filters == (32, 70, 160) and ml6.model.side_kernel_size == 5
    for name in ("ml1", "ml2", "ml4", "ml5", "ml6"):
        c = cli.parse_args(["--config", str(ROOT / f"configs/{name}.py")]).config
        assert c.data.resize_method == "nearest" and c.data.image_size == 128
        assert c.train.batch_size == 32 and c.optimizer.eps == 1e-7 and c.optimizer.name == "keras_adam"


def test_overrides_are_typed_and_both_forms_work():
    args = cli.parse_args([
        "--config", str(ROOT / "configs/ml6.py"),
        "--config.train.batch_size=8", "--config.optimizer.learning_rate", "2e-4",
        "--config.augment.horizontal_flip=false", "--config.data.class_repeats=(1,1,1,1,4)",
        "--config.model.conv_paddings=same,valid,same", "--config.model.conv_dropouts=(0, 0.5, 0)",
        "--workdir", "/tmp/x",
    ])
    c = args.config
    assert c.train.batch_size == 8 and c.optimizer.learning_rate == 2e-4
    assert c.augment.horizontal_flip is False
    assert c.data.class_repeats == (1, 1, 1, 1, 4)
    assert c.model.conv_paddings == ("same", "valid", "same")
    assert c.model.conv_dropouts == (0.0, 0.5, 0.0) and type(c.model.conv_dropouts[0]) is float
    assert args.workdir == "/tmp/x"


def test_one_tuples_in_bare_words():
    c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
    for key, text, expected in (("model.conv_paddings", "(same,)", ("same",)),
                                ("model.conv_paddings", "same,", ("same",)),
                                ("model.conv_pools", "(true,)", (True,)),
                                ("model.conv_filters", "(8,)", (8,)),
                                ("model.conv_paddings", "(same, valid)", ("same", "valid"))):
        config_lib.apply_override(c, key, text)
        assert c[key.split(".")[0]][key.split(".")[1]] == expected, (key, text)
    c.model.conv_filters, c.model.conv_kernel_sizes, c.model.conv_dropouts = (8, 8), (3, 3), (0.0, 0.0)
    c.model.conv_pools = (True, True)
    config_lib.apply_override(c, "model.conv_paddings", "(same,,)")  # only one trailing comma is dropped:
    with pytest.raises(ConfigError, match="'model.conv_paddings' must be each in"):  # the empty part is refused
        config_lib.validate(c)


@pytest.mark.parametrize("override, message", [
    ("--config.train.batchsize=3", "unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)"),
    ("--config.nothing=3", "unknown config key 'nothing'"),
    ("--config.train=3", "unknown config key 'train'"),
    ("--config.train.batch_size=abc", "config key 'train.batch_size' expects an int, got 'abc'"),
    ("--config.train.batch_size=3.5", "expects an int"),
    ("--config.augment.horizontal_flip=maybe", "expects a bool"),
    ("--config.data.class_repeats=(1,2.5)", "'data.class_repeats' must be a tuple of ints >= 1"),
    ("--config.model.conv_paddings=(1,2,3)", "'model.conv_paddings' expects a tuple of str"),
    ("--config.train.batch_size=0", "config key 'train.batch_size' must be >= 1, got 0"),
    ("--config.model.conv_dropouts=(0,1.0,0)", "'model.conv_dropouts' must be rates in [0, 1)"),
    ("--config.model.conv_filters=(8,8)", "'model.conv_kernel_sizes' must be of length 2"),
    ("--config.data.image_size=0", "'data.image_size' must be >= 1 pixel"),
    ("--config.optimizer.decay_steps=0", "'optimizer.decay_steps' must be >= 1 update"),
    ("--config.train.early_stopping.patience=-1", "'train.early_stopping.patience' must be >= 0"),
    ("--config.data.builder=csv", "'data.builder' must be one of"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), "--config.data.dri=x"])
    text = str(info.value)
    assert "(did you mean 'data.dir'?); valid keys in 'data': " in text
    all_keys = list(config_lib.leaf_keys(config_lib.base_config()))
    assert all(key in text for key in all_keys if key.startswith("data."))
    assert "train.batch_size" not in text
    with pytest.raises(ConfigError) as info:  # no such section: every key is listed
        cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), "--config.trian.epochs=x"])
    assert "; valid keys: " in str(info.value) and all(key in str(info.value) for key in all_keys)


def test_bad_command_lines():
    with pytest.raises(ConfigError, match="--config configs/NAME.py is required"):
        cli.parse_args([])
    with pytest.raises(ConfigError, match="config file 'nope.py' not found"):
        cli.parse_args(["--config", "nope.py"])
    with pytest.raises(ConfigError, match="unknown flag --outt"):
        cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), "--outt", "x"], {"out": str})


def test_config_file_with_foreign_key_is_rejected(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from imgclf_jax.config import base_config\n"
        "def get_config():\n    c = base_config()\n    c.train.epochs = 3\n    return c\n"
    )
    with pytest.raises(ConfigError, match="unknown config key 'train.epochs'"):
        cli.parse_args(["--config", str(path)])


def run_tool(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, capture_output=True, text=True)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    done = run_tool("imgclf_jax.preview", "--config", "configs/ml6.py", "--config.train.batchsize=3")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("imgclf_jax.preview: error: unknown config key 'train.batchsize'")

    done = run_tool("imgclf_jax.preview", "--config", "configs/ml1.py",
                    f"--config.data.dir={tmp_path / 'absent'}", f"--config.data.cache_dir={tmp_path / 'c'}")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "not found" in lines[0] and "Kaggle" in lines[0]
    assert "deepfake-classification-unibuc" in lines[0] and "configs/digits.py needs no download" in lines[0]


def test_help_prints_the_tools_documentation():
    done = run_tool("imgclf_jax.train", "--help")
    assert done.returncode == 0 and "python -m imgclf_jax.train --config configs/NAME.py" in done.stdout
    for builder in builders.BUILDERS:  # train --help lists the builders and points to the keys
        assert re.search(rf"^  {builder} ", done.stdout, re.M), builder
    assert "imgclf_jax/config.py" in done.stdout and "configs/folders.py" in done.stdout


def test_folders_template_config():
    args = cli.parse_args(["--config", str(ROOT / "configs/folders.py")])
    c = args.config
    assert c.data.builder == "folders" and c.data.dir == "data/my_images" and c.data.num_classes == 0
    assert c.data.image_size == 64 and c.model.conv_filters == (32, 64, 128)
    assert "--config.data.dir=PATH" in (ROOT / "configs/folders.py").read_text().split('"""')[1]
    mine = cli.parse_args(["--config", str(ROOT / "configs/folders.py"), "--config.data.dir=/data/pets"])
    assert mine.config.data.dir == "/data/pets" and mine.workdir == "runs/folders"


@pytest.mark.parametrize("config, override, message", [
    ("digits", "--config.data.dir=/some/folder",
     "config key 'data.dir' ('/some/folder') is not used by data.builder='digits' (the digits are bundled "
     "with scikit-learn): set --config.data.dir='', or use data.builder=competition or folders"),
    ("digits", "--config.data.num_classes=5",
     "config key 'data.num_classes' (5) is not used by data.builder='digits' (the digits have 10 classes): "
     "set --config.data.num_classes=0 or --config.data.num_classes=10"),
    ("ml1", "--config.data.builder=digits", "config key 'data.dir' ('data/deepfake-classification-unibuc') is "
     "not used by data.builder='digits'"),
    ("ml1", "--config.data.dir=", "config key 'data.dir' must name the data folder for data.builder='competition'"),
    ("folders", "--config.data.dir=", "config key 'data.dir' must name the data folder for data.builder='folders'"),
])
def test_keys_the_builder_ignores_are_refused(config, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cli.parse_args(["--config", str(ROOT / f"configs/{config}.py"), override])
    # The refusal is one line on the command line, before anything runs.
    done = run_tool("imgclf_jax.train", "--config", f"configs/{config}.py", override)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and message in done.stderr


def test_keys_the_builder_uses_are_accepted():
    assert cli.parse_args(["--config", str(ROOT / "configs/digits.py"), "--config.data.num_classes=10"])
    args = cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), "--config.data.builder=digits",
                           "--config.data.dir=", "--config.data.num_classes=0"])  # ml1 declares 5 classes
    assert args.config.data.builder == "digits" and args.config.data.dir == ""
    args = cli.parse_args(["--config", str(ROOT / "configs/folders.py"), "--config.data.num_classes=12"])
    assert args.config.data.num_classes == 12  # folders: checked against the class folders in the scan


def test_more_override_forms_and_config_file_failures(tmp_path):
    args = cli.parse_args(["--config", str(ROOT / "configs/ml6.py"),
                           "--config.model.conv_paddings=[same,valid,same]",
                           "--config.model.conv_pools=true,false,true"])
    assert args.config.model.conv_paddings == ("same", "valid", "same")
    assert args.config.model.conv_pools == (True, False, True)
    for bad, message in [("--config.seed=-1", "'seed' must be in [0, 2**32)"),
                         ("--config.augment.rotation_deg=inf", "'augment.rotation_deg' must be finite"),
                         ("--config.data.cache_dir=", "'data.cache_dir' must be a folder path")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), bad])
    with pytest.raises(ConfigError, match="flag --overwrite is true or false"):
        cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), "--overwrite=maybe"], {"overwrite": bool})
    broken = tmp_path / "broken.py"
    broken.write_text("from imgclf_jax.config import base_config\n"
                      "def get_config():\n    c = base_config()\n    c.train.batch_size = 32.5\n    return c\n")
    with pytest.raises(ConfigError, match=r"get_config\(\) failed: TypeError"):
        cli.parse_args(["--config", str(broken)])
    data = tmp_path / "train.csv"
    data.write_text("image_id,label\n")
    with pytest.raises(ConfigError, match="is not a Python file"):
        cli.parse_args(["--config", str(data)])


def test_a_missing_config_lists_the_available_configs(tmp_path):
    done = run_tool("imgclf_jax.train", "--config", "configs/ml7.py")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "config file 'configs/ml7.py' not found; available: configs/digits.py, configs/folders.py, configs/ml1.py," in done.stderr
    assert "configs/ml6_ensemble.py" in done.stderr
    own = tmp_path / "mine"
    own.mkdir()
    (own / "b.py").write_text("")
    (own / "a.py").write_text("")
    (own / "_helpers.py").write_text("")
    with pytest.raises(ConfigError, match=r"not found; available: .*mine/a\.py, .*mine/b\.py$"):
        config_lib.load_config_file(str(own / "c.py"))


def test_every_flag_a_config_tool_takes_is_used():
    # summary writes nothing: --workdir is refused, not ignored.
    done = run_tool("imgclf_jax.summary", "--config", "configs/digits.py", "--workdir", "runs/x")
    assert done.returncode == 2 and "unknown flag --workdir" in done.stderr
    # preview writes --out, else WORKDIR/preview.png: both at once is refused.
    done = run_tool("imgclf_jax.preview", "--config", "configs/digits.py", "--out", "g.png", "--workdir", "runs/x")
    assert done.returncode == 2 and "give --out FILE or --workdir DIR, not both" in done.stderr


def test_preview_writes_into_the_workdir_without_out(tmp_path, capsys):
    from imgclf_jax import preview

    code = preview.main(["--config", str(ROOT / "configs/digits.py"), "--workdir", str(tmp_path / "w"),
                         f"--config.data.cache_dir={tmp_path / 'cache'}", "--num_images", "4"])
    assert code == 0 and (tmp_path / "w" / "preview.png").stat().st_size > 0
    assert f"wrote {tmp_path / 'w' / 'preview.png'} (4 images)" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["--config.augment.ops=keras_affine,blur"],
     "config key 'augment.ops' must be one of ('keras_affine', 'horizontal_flip', 'random_crop'), got 'blur'"),
    (["--config.augment.ops=keras_affine,keras_affine"],
     "config key 'augment.ops' lists 'keras_affine' twice (keras_affine, keras_affine): each op runs at most once"),
    (["--config.augment.ops=(horizontal_flip,)"],  # ml6 sets rotation_deg=20: it would be ignored
     "config key 'augment.rotation_deg' (20.0) belongs to op 'keras_affine', which augment.ops (horizontal_flip) "
     "does not list: add the op or leave the key at 0.0"),
    (["--config.augment.zoom_fraction=1.5"], "config key 'augment.zoom_fraction' must be in [0, 1), got 1.5"),
    (["--config.loss.name=focal"], "config key 'loss.name' must be one of ('softmax_cross_entropy',), got 'focal'"),
    (["--config.train.batch_transform=cutout"],
     "config key 'train.batch_transform' must be '' (off) or one of ('mixup', 'cutmix', 'mixup_cutmix'), "
     "got 'cutout'"),
    (["--config.train.eval_transform=five_crop"],
     "config key 'train.eval_transform' must be '' (off) or one of ('horizontal_flip_tta', 'flip_shift_tta'), got 'five_crop'"),
])
def test_recipe_names_are_checked_against_their_tables(overrides, message):
    with pytest.raises(ConfigError) as info:
        cli.parse_args(["--config", str(ROOT / "configs/ml6.py"), *overrides])
    assert str(info.value) == message


@pytest.mark.parametrize("overrides, message", [
    (["--config.data.channel_mean=0.5,0.5,0.5"],
     "config key 'data.channel_mean' is set but 'data.channel_std' is not: set both (3 values each, R, G, B) or "
     "neither (off); `python -m imgclf_jax.channel_stats --config ...` computes them"),
    (["--config.data.channel_std=0.2,0.2,0.2"], "config key 'data.channel_std' is set but 'data.channel_mean' is not"),
    (["--config.data.channel_mean=0.5,0.5", "--config.data.channel_std=0.2,0.2,0.2"],
     "config key 'data.channel_mean' must be 3 finite numbers (R, G, B, in units of the [0, 1] pixel scale) or () "
     "(off), got (0.5, 0.5)"),
    (["--config.data.channel_mean=0.5,0.5,0.5", "--config.data.channel_std=0.2,0.0,0.2"],
     "config key 'data.channel_std' must be > 0 in every channel, got (0.2, 0.0, 0.2)"),
    (["--config.data.channel_mean=0.5,0.5,x", "--config.data.channel_std=0.2,0.1,0.2"],
     "config key 'data.channel_mean' must be 3 finite numbers"),
])
def test_channel_normalization_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError) as info:
        cli.parse_args(["--config", str(ROOT / "configs/ml6.py"), *overrides])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_channel_normalization_keys_default_off_and_take_three_numbers():
    c = config_lib.base_config()
    assert c.data.channel_mean == () and c.data.channel_std == ()
    args = cli.parse_args(["--config", str(ROOT / "configs/ml6.py"), "--config.data.channel_mean=0.5,0.4,0.3",
                           "--config.data.channel_std=(0.25, 0.2, 1)"])
    assert args.config.data.channel_mean == (0.5, 0.4, 0.3) and args.config.data.channel_std == (0.25, 0.2, 1)


def test_recipe_keys_default_to_today_and_override():
    c = config_lib.base_config()
    assert c.augment.ops == ("keras_affine", "horizontal_flip") and c.loss.name == "softmax_cross_entropy"
    assert c.train.batch_transform == "" and c.train.eval_transform == ""
    args = cli.parse_args(["--config", str(ROOT / "configs/ml6.py"), "--config.augment.ops=horizontal_flip,keras_affine",
                           "--config.train.eval_transform=horizontal_flip_tta"])
    assert args.config.augment.ops == ("horizontal_flip", "keras_affine")
    assert args.config.train.eval_transform == "horizontal_flip_tta"
    args = cli.parse_args(["--config", str(ROOT / "configs/ml1.py"), "--config.augment.ops=()"])
    assert args.config.augment.ops == ()  # ml1 augments nothing: an empty list is valid


def test_a_channel_mean_on_the_0_255_scale_is_refused_in_one_line():
    c = config_lib.base_config()
    c.data.channel_mean, c.data.channel_std = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)
    with pytest.raises(ConfigError, match=r"config key 'data.channel_mean' must be in \[0, 1\] \(the \[0, 1\] "
                                          r"pixel scale, not 0..255: divide by 255\), got \(123.7, 116.3, 103.5\)"):
        config_lib.validate(c)
