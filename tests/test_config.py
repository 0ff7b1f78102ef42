import pytest
import yaml

from ospo_fast.config import (
    ConfigError,
    OSPOConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_names,
    save_config,
)


def test_defaults_follow_spec():
    c = OSPOConfig()
    assert (c.images.guidance_scale, c.images.temperature) == (5.0, 1.0)
    assert (c.masks.skip_layers, c.masks.otsu_scale, c.masks.context) == (5, 0.8, "base")
    assert (c.filter.tau, c.perturb.num_perturbations) == (0.6, 3)
    assert (c.loss.beta, c.loss.gamma_beta_ratio, c.loss.alpha, c.loss.sft_weight) == (5.0, 0.5, 1.0, 2.0)
    assert (c.train.lora_r, c.train.lora_alpha, c.train.lora_dropout) == (64, 128, 0.05)
    assert (c.train.lr, c.train.betas, c.train.min_lr, c.train.warmup_ratio) == (1e-5, [0.9, 0.95], 1e-7, 0.05)
    assert (c.questions.temperature, c.questions.top_p) == (1.2, 0.5)


@pytest.mark.parametrize("name", ["tiny", "janus-pro-1b", "janus-pro-7b"])
def test_presets_load(name):
    assert name in preset_names()
    assert isinstance(load_config(name), OSPOConfig)


def test_round_trip(tmp_path):
    c = load_config("tiny", ["train.lr=3e-4", "loss.normalization=length", "train.betas=[0.8,0.9]"])
    path = save_config(c, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert config_to_dict(again) == config_to_dict(c)
    assert again.train.lr == 3e-4 and again.loss.normalization == "length" and again.train.betas == [0.8, 0.9]


def test_override_int_to_float_and_nested():
    c = load_config(None, ["loss.beta=2", "seed=7"])
    assert c.loss.beta == 2.0 and isinstance(c.loss.beta, float) and c.seed == 7


@pytest.mark.parametrize("override, words", [
    ("train.nope=1", ["train.nope", "valid keys", "lr"]),
    ("nope.lr=1", ["nope", "valid keys", "train"]),
    ("train.max_steps=1.5", ["train.max_steps", "integer"]),
    ("train.lora=maybe", ["train.lora", "true or false"]),
    ("loss.normalization=mean", ["loss.normalization", "weighted_mean"]),
    ("train.lr", ["section.key=value"]),
    ("train=3", ["section"]),
])
def test_bad_overrides_name_the_value(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_missing_preset():
    with pytest.raises(ConfigError, match="presets"):
        load_config("no-such-preset")
