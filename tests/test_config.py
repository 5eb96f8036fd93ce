import json
import re

import pytest

from d3fast.config import Config, available_presets, load_preset, resolve_config, to_dict
from d3fast.errors import D3FastError


def test_defaults_preset_overrides_order():
    base = Config()
    cfg = resolve_config("digits")
    preset = load_preset("digits")
    assert cfg.experts.num_experts == preset["experts"]["num_experts"] != base.experts.num_experts
    assert cfg.experts.lr == base.experts.lr  # not in the preset: default survives
    cfg = resolve_config("digits", overrides=["experts.num_experts=7", "experts.lr=0.5", "data.zca=yes"])
    assert (cfg.experts.num_experts, cfg.experts.lr, cfg.data.zca) == (7, 0.5, True)
    typed = resolve_config("digits", typed_overrides={"experts": {"epochs": 3}}, overrides=["experts.epochs=4"])
    assert typed.experts.epochs == 4  # string overrides come last


def test_every_preset_resolves():
    names = available_presets()
    assert {"digits", "fashion-mnist", "cifar10", "tinyimagenet", "imagenette", "imagewoof"} <= set(names)
    for name in names:
        cfg = resolve_config(preset=name)
        assert cfg.preset == name
        assert cfg.data.dataset in name


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experts.lrr=1"], "unknown config key 'experts.lrr'; valid keys here: experts.num_experts"),
        (["nosection.x=1"], "unknown config key 'nosection'"),
        (["experts.epochs=ten"], "experts.epochs: expected int, got 'ten'"),
        (["data.zca=maybe"], "expected true/false"),
        (["experts=3"], "is a section"),
        (["net.norm=fancy"], "net.norm: 'fancy' is not one of"),
        (["experts.lr"], "must look like section.key=value"),
        (["experts.epochs=0"], "experts.epochs must be >= 1, got 0"),
        (["distill.steps=-1"], "distill.steps must be >= 1, got -1"),
        (["distill.lr_latent=-1"], "distill.lr_latent must be >= 0, got -1.0"),
        (["distill.lr_teacher=-1"], "distill.lr_teacher must be > 0, got -1.0"),
        (["distill.lr_latent=nan"], "distill.lr_latent must be finite, got nan"),
        (["distill.kl_weight=inf"], "distill.kl_weight must be finite, got inf"),
        (["distill.decoder_width=0"], "distill.decoder_width must be >= 1, got 0"),
        (["data.zca_eps=0"], "data.zca_eps must be > 0, got 0.0"),
        (["augment.prob_flip=1.5"], "augment.prob_flip must be <= 1, got 1.5"),
        (["eval.momentum=1.5"], "eval.momentum must be <= 1"),
        (["experts.seed=-3"], "experts.seed must be >= 0"),
        (["distill.mmd_bandwidths=[]"], "distill.mmd_bandwidths: need 1 to 16 values in [1e-6, 1e6], got []"),
        (["distill.mmd_bandwidths=[1, -2]"], "need 1 to 16 values in [1e-6, 1e6]"),
        (["distill.mmd_bandwidths=[1e-300]"], "need 1 to 16 values in [1e-6, 1e6]"),
        (["eval.lr_grid=[0.01, -1]"], "eval.lr_grid: need at most 16 distinct learning rates in (0, 10], got [0.01, -1.0]"),
        (["eval.lr_grid=[nan]"], "eval.lr_grid: need at most 16 distinct learning rates in (0, 10]"),
        ([f"eval.lr_grid={[0.01 * (i + 1) for i in range(17)]}"], "need at most 16 distinct learning rates"),
        (["eval.protocol=fair"], "eval.protocol: 'fair' is not one of equal_steps, per_set"),
        (["distill.lr_param=exp"], "distill.lr_param: 'exp' is not one of log, leaky_relu"),
        (["distill.health_steps=-1"], "distill.health_steps must be >= 0"),
        (["distill.lr_latent=1e308"], "distill.lr_latent is out of range: 1e+308"),
        (["distill.z_dim=99999999999999999999"], "distill.z_dim is out of range"),
        (["distill.seed=99999999999999999999"], "distill.seed is out of range"),
        (["distill.students_per_step=99999"], "distill.students_per_step must be <= 1024"),
        (["augment.strategy="], "augment.strategy: '' is not ops from"),
        (["augment.strategy=color_blur"], "augment.strategy: 'color_blur' is not ops from"),
        (["distill.mmd_samples=1"], "distill.mmd_samples: the unbiased MMD needs at least 2 samples per class"),
        (["net.norm=batchnorm", "distill.unroll=flat"], "distill.unroll=flat needs a student without running statistics"),
        (["eval.archs=[]"], "eval.archs"),
        (["distill.dtype=float16"], "distill.dtype: 'float16' is not one of float32, float64"),
        (["distill.dtype=float64", "distill.amp=true"], "distill.amp (bf16 autocast, --amp) and distill.dtype=float64"),
        # issue 32: a value key given a section, in either order
        (["distill.steps.x=1"], "config key 'distill.steps' is a value, not a section: there is no distill.steps.x"),
        (["distill.steps=1", "distill.steps.x=2"], "override 'distill.steps.x=2': distill.steps is set as a value"),
        (["distill.steps.x=2", "distill.steps=1"], "override 'distill.steps=1': distill.steps is set as a section"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(D3FastError, match=re.escape(message)):
        resolve_config("digits", overrides=overrides)


def test_every_numeric_key_has_a_range():
    """A new numeric key without `ranged(...)` would accept any value: negative counts, NaN."""
    import dataclasses

    from d3fast.config import Config

    cfg = Config()
    for part in dataclasses.fields(cfg):
        obj = getattr(cfg, part.name)
        if not dataclasses.is_dataclass(obj):
            continue
        for f in dataclasses.fields(obj):
            if type(getattr(obj, f.name)) in (int, float):
                assert f.metadata.get("lo") is not None, f"{part.name}.{f.name}"


def test_batchnorm_students_with_the_naive_unroll_are_fine():
    assert resolve_config("digits", overrides=["net.norm=batchnorm", "distill.unroll=naive"]).net.norm == "batchnorm"
    # auto runs a student with running statistics all naive
    assert resolve_config("digits", overrides=["net.norm=batchnorm"]).distill.unroll == "auto"


def test_typed_values_are_checked():
    with pytest.raises(D3FastError, match="expected int, got True"):
        resolve_config("digits", typed_overrides={"experts": {"epochs": True}})
    with pytest.raises(D3FastError, match="expected str"):
        resolve_config("digits", typed_overrides={"net": {"name": 3}})
    cfg = resolve_config("digits", typed_overrides={"experts": {"lr": 1}})
    assert isinstance(cfg.experts.lr, float)


def test_preset_dataset_mismatch_and_unknowns():
    with pytest.raises(D3FastError, match="preset 'cifar10' is for dataset 'cifar10', not 'digits'"):
        resolve_config("digits", preset="cifar10")
    with pytest.raises(D3FastError, match="unknown preset 'nope'"):
        resolve_config(preset="nope")
    with pytest.raises(D3FastError, match="unknown dataset 'mnist2'"):
        resolve_config("mnist2")


def test_optional_none_and_dump():
    cfg = resolve_config("digits", overrides=["data.data_path=/x/y"])
    assert cfg.data.data_path == "/x/y"
    cfg = resolve_config("digits", overrides=["data.data_path=none"])
    assert cfg.data.data_path is None
    d = to_dict(cfg)
    assert d["experts"]["num_experts"] == cfg.experts.num_experts and d["preset"] == "digits"


def test_presets_train_experts_long_enough_for_distillation():
    for name in available_presets():
        cfg = resolve_config(preset=name)
        assert cfg.experts.epochs >= cfg.distill.max_start_epoch + cfg.distill.expert_epochs, name


def test_a_toml_config_file_reads_back_to_the_same_config(tmp_path):
    """`d3fast config --format toml > f.toml`, then `--config f.toml`, equals the --set run."""
    from click.testing import CliRunner

    from d3fast.cli import cli
    from d3fast.config import to_dict, to_toml

    sets = ["eval.archs=convnet,resnet18", "distill.mmd_bandwidths=[1,2.5]", "net.width=32", "device=cpu"]
    cfg = resolve_config("cifar100", overrides=sets)
    assert cfg.eval.archs == ["convnet", "resnet18"] and cfg.distill.mmd_bandwidths == [1.0, 2.5]
    res = CliRunner().invoke(cli, ["config", "--dataset", "cifar100", *[x for s in sets for x in ("--set", s)],
                                   "--format", "toml"])
    assert res.exit_code == 0, res.output
    (tmp_path / "mine.toml").write_text(res.output)
    assert res.output == to_toml(cfg)
    back = resolve_config(preset=str(tmp_path / "mine.toml"))
    assert to_dict(back) | {"preset": ""} == to_dict(cfg) | {"preset": ""}
    via_cli = CliRunner().invoke(cli, ["config", "--config", str(tmp_path / "mine.toml")])
    assert via_cli.exit_code == 0 and '"width": 32' in via_cli.output
    # the same validation as a packaged preset
    (tmp_path / "bad.toml").write_text("[net]\nwidth = 0\n")
    with pytest.raises(D3FastError, match="net.width must be >= 1"):
        resolve_config(preset=str(tmp_path / "bad.toml"))
    with pytest.raises(D3FastError, match="does not exist"):
        resolve_config(preset=str(tmp_path / "none.toml"))


def test_a_partial_config_file_layers_on_its_datasets_preset(tmp_path):
    # issue 32: a file with a few keys once fell back to the generic defaults (digits: 100
    # experts x 50 epochs instead of the preset's); it holds what differs from the dataset's
    # preset, as docs/commands.md says, whether --dataset or its own data.dataset names the dataset
    from d3fast.config import to_dict

    want = to_dict(resolve_config("digits", overrides=["experts.epochs=3"]))
    (tmp_path / "few.toml").write_text("[experts]\nepochs = 3\n")
    got = resolve_config("digits", preset=str(tmp_path / "few.toml"))
    assert to_dict(got) | {"preset": ""} == want | {"preset": ""} and got.experts.epochs == 3
    (tmp_path / "named.toml").write_text('[data]\ndataset = "digits"\n[experts]\nepochs = 3\n')
    assert to_dict(resolve_config(preset=str(tmp_path / "named.toml"))) | {"preset": ""} == want | {"preset": ""}
    assert want["experts"]["num_experts"] != resolve_config().experts.num_experts  # the preset differs from the defaults


@pytest.mark.parametrize("text, expected", [("1,2", [1.0, 2.0]), ("[1,2]", [1.0, 2.0]), ("[1, 2]", [1.0, 2.0]),
                                            ("4", [4.0])])
def test_list_values_take_bare_and_json_forms(text, expected):
    assert resolve_config("digits", overrides=[f"distill.mmd_bandwidths={text}"]).distill.mmd_bandwidths == expected


def test_presets_lists_every_packaged_preset():
    from click.testing import CliRunner

    from d3fast.cli import cli
    from d3fast.config import available_presets

    res = CliRunner().invoke(cli, ["presets"])
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.output.splitlines()] == available_presets()


def test_repeated_lr_grid_values_count_once():
    cfg = resolve_config("digits", overrides=["eval.lr_grid=" + json.dumps([0.01] * 17 + [0.1])])
    assert sorted(set(cfg.eval.lr_grid)) == [0.01, 0.1]


def test_a_config_file_that_python_cannot_hold_is_one_error(tmp_path):
    # issue 32's second round: a 5,000-digit int (past int()'s conversion limit) and arrays
    # nested 5,000 deep (RecursionError) were "unexpected" crashes; a directory "did not exist"
    (tmp_path / "big.toml").write_text(f"[distill]\nsteps = {'9' * 5000}\n")
    with pytest.raises(D3FastError, match="is not a usable config \\(ValueError"):
        resolve_config(preset=str(tmp_path / "big.toml"))
    (tmp_path / "deep.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(D3FastError, match="is not a usable config \\(RecursionError|is not valid TOML"):
        resolve_config(preset=str(tmp_path / "deep.toml"))
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(D3FastError, match="dir.toml is not a regular file"):
        resolve_config(preset=str(tmp_path / "dir.toml"))
