"""Config: YAML + dotted overrides, strict keys and types with suggestions, --help."""

import pytest
import yaml
from conftest import ROOT

from gan_dist.config import Config, field_docs, help_lines, load_config
from gan_dist.errors import UserError


def test_overrides_apply_on_top_of_yaml():
    cfg = load_config(str(ROOT / "configs" / "default.yaml"), ["train.total_kimg=2", "optim.discriminator.lr=4e-4"])
    assert cfg.train.total_kimg == 2.0
    assert cfg.optim.discriminator.lr == 4e-4
    assert cfg.optim.generator.lr == 5e-4 and cfg.optim.generator.beta1 == 0.0  # from the YAML


@pytest.mark.parametrize("override, message", [
    ("train.totl_kimg=2", "unknown config key 'train.totl_kimg'; did you mean 'train.total_kimg'?"),
    ("optim.discriminatr.lr=1", "unknown config key 'optim.discriminatr'; did you mean 'optim.discriminator'?"),
    ("modle.name=mlp", "unknown config key 'modle'; did you mean 'model'?"),
    ("train.batch_size=abc", "config key 'train.batch_size': Value 'abc'"),
    ("train.mixed_precision=fp8", "config key 'train.mixed_precision': Invalid value 'fp8', expected one of"),
    ("model.latent_dim=0", "config key 'model.latent_dim' must be > 0"),
    ("train.total_kimg", "is not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'train.batch_sise'; did you mean 'train.batch_size'"):
        load_config(str(path), [])


def test_yaml_no_is_a_precision_not_a_boolean(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(path), []).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_missing_config_file_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        load_config("nope.yaml", [])


def test_every_field_has_a_one_line_doc():
    import dataclasses
    import typing

    def walk(cls) -> int:
        docs, hints, seen = field_docs(cls), typing.get_type_hints(cls), 0
        for f in dataclasses.fields(cls):
            assert docs.get(f.name) and "\n" not in docs[f.name], f"{cls.__name__}.{f.name} needs a one-line doc"
            seen += walk(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else 1
        return seen

    assert walk(Config) > 40


def test_help_lists_every_leaf_with_its_doc():
    text = "\n".join(help_lines())
    assert "train.total_kimg (float, default 1000.0)" in text
    assert "Length of training in thousands of real images shown to D." in text
    assert "train.mixed_precision (no|bf16|fp16" in text
    assert "optim.discriminator.lr" in text


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(str(path), [])
        assert yaml.safe_load(path.read_text())


def test_gan_dist_check_validates_registries(capsys):
    from gan_dist.cli import main

    assert main(["check", str(ROOT / "configs" / "tiny.yaml"), "train.batch_size=8"]) == 0
    assert "batch_size: 8" in capsys.readouterr().out
    assert main(["check", str(ROOT / "configs" / "tiny.yaml"), "model.name=dcgn"]) == 2
    assert "unknown model 'dcgn'; did you mean 'dcgan'?" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["optim.generator.warmup_kimg=-5", "log.sample_every_kimg=0",
                                      "optim.discriminator.grad_clip_norm=-1", "train.ema_rampup=-0.1",
                                      "optim.generator.eps=0", "data.max_shard_retries=-1", "train.num_threads=-2"])
def test_out_of_range_values_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"config key '{key}'"):
        load_config(None, [override])


def test_a_removed_key_says_what_replaced_it(tmp_path):
    with pytest.raises(UserError, match=r"config key 'data.cache_mb' was removed: .*data.resident.*delete the key"):
        load_config(None, ["data.cache_mb=512"])
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  cache_mb: 512\n")
    with pytest.raises(UserError, match="'data.cache_mb' was removed"):
        load_config(str(path), [])


def test_invalid_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="broken.yaml' is not valid YAML"):
        load_config(str(path), [])


def test_gan_dist_check_sees_batch_split_data_and_model_fit(capsys, digits_dir, tmp_path):
    """What slurm/train.sh relies on to fail a job before any node starts."""
    from gan_dist.cli import main

    tiny = str(ROOT / "configs" / "tiny.yaml")
    good = [f"data.path={digits_dir}", f"run.root={tmp_path}"]
    assert main(["check", "--print-run-dir", "--world-size", "4", tiny, *good]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(tmp_path / "tiny")
    assert "note: data.dataset='digits' is ignored: data.path is set" in printed.err
    assert main(["check", "--world-size", "3", tiny, *good]) == 2
    assert "not divisible by 3 processes" in capsys.readouterr().err
    assert main(["check", tiny, f"data.path={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["check", tiny, *good, "model.name=dcgan"]) == 2
    assert "needs images of C x H x W whose shorter side is 16, 32, 64 px" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "check must not create anything"


@pytest.mark.parametrize("config, overrides, noted", [
    ("tiny.yaml", ["data.path=shards"], True),  # data.dataset: digits, the default, but written in the file
    ("dcgan_mnist32.yaml", ["data.path=shards"], True),  # mnist: not the default
    ("tiny.yaml", ["data.path=shards", "data.dataset="], False),  # '' says so
    ("own_images.yaml", ["data.path=shards"], False),
    ("tiny.yaml", [], False),  # no data.path: data.dataset is used
    (None, ["data.path=shards"], False),  # the default dataset, never mentioned
    (None, ["data.path=shards", "data.dataset=digits"], True),
])
def test_check_notes_a_data_dataset_that_data_path_overrides(config, overrides, noted):
    from gan_dist.config import given_keys
    from gan_dist.config_checks import notes

    path = str(ROOT / "configs" / config) if config else None
    found = notes(load_config(path, overrides), given_keys(path, overrides))
    assert bool(found) == noted, found
    if noted:
        assert found[0].startswith("data.dataset=") and "is ignored: data.path is set" in found[0]
        assert "set data.dataset='' to say so" in found[0]


def test_deepspeed_engine_config_merges_the_json_and_refuses_keys_we_own(tmp_path):
    from gan_dist.parallel.zero import engine_config

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      ["train.backend=deepspeed", "deepspeed.zero_stage=2", "optim.generator.grad_clip_norm=5",
                       f"deepspeed.generator_json={ROOT / 'launch' / 'deepspeed' / 'zero2-buckets.json'}"])
    G = engine_config(cfg, "G", batch_per_device=16, world_size=2, num_parameters=3_000_000)
    assert G["train_batch_size"] == 32 and G["gradient_clipping"] == 5.0
    assert G["zero_optimization"]["stage"] == 2 and G["zero_optimization"]["overlap_comm"] is True
    assert "overlap_comm" not in engine_config(cfg, "D", 16, 2, 1000)["zero_optimization"]
    # Buckets follow the network (DeepSpeed's 5e8-element default is 2 GB per fp32 engine),
    # rounded up to 2^20 elements; the JSON still wins where it sets them.
    assert engine_config(cfg, "D", 16, 2, 1000)["zero_optimization"]["reduce_bucket_size"] == 2**20
    assert engine_config(cfg, "D", 16, 2, 3_000_000)["zero_optimization"]["allgather_bucket_size"] == 3 * 2**20
    assert engine_config(cfg, "D", 16, 2, 10**10)["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    bad = tmp_path / "bad.json"
    bad.write_text('{"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 3}}')
    cfg.deepspeed.generator_json = str(bad)
    with pytest.raises(UserError, match="'optimizer' .set optim.*'zero_optimization.stage' .set deepspeed.zero_stage"):
        engine_config(cfg, "G", 16, 2, 1000)


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stage=3", "must be 0, 1 or 2"),
    ("train.num_micro_batches=2", "must be 1 under train.backend=deepspeed"),
])
def test_deepspeed_settings_we_cannot_honour_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["train.backend=deepspeed", override])
