"""Configs: presets match the paper, JSON round trip, every invalid combination is named."""

import dataclasses

import pytest

from minielectra.config import ConfigError, ElectraConfig, TrainConfig, from_json, override, preset, to_json


def test_tiny_preset():
    m, t = preset("tiny")
    assert (m.embedding_size, m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == \
        (128, 128, 4, 2, 512)
    assert (m.generator_hidden_size, m.generator_num_attention_heads, m.generator_intermediate_size) == (32, 1, 128)
    assert (m.vocab_size, t.seq_len) == (8192, 128)


def test_small_preset_is_electra_small():
    m, t = preset("small")
    assert (m.vocab_size, m.embedding_size, m.hidden_size, m.num_hidden_layers, m.num_attention_heads,
            m.intermediate_size) == (30522, 128, 256, 12, 4, 1024)
    assert (m.generator_hidden_size, m.generator_num_attention_heads, m.generator_intermediate_size) == (64, 1, 256)
    assert (t.seq_len, t.batch_size, t.learning_rate, t.warmup_steps) == (128, 128, 5e-4, 10_000)
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.weight_decay, t.max_grad_norm) == (0.9, 0.999, 1e-6, 0.01, 1.0)
    assert (m.layer_norm_eps, m.initializer_range, m.hidden_dropout_prob, m.rtd_weight) == (1e-12, 0.02, 0.1, 50.0)


def test_presets_are_fresh_copies():
    m, _ = preset("tiny")
    m.hidden_size = 999
    assert preset("tiny")[0].hidden_size == 128


def test_json_round_trip_and_partial_files():
    m, t = preset("small")
    assert from_json(to_json(m, t)) == (m, t)
    m2, t2 = from_json('{"train": {"steps": 7}}')
    assert m2 == ElectraConfig() and t2.steps == 7


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=100, num_attention_heads=3), "not divisible"),
    (dict(generator_hidden_size=30, generator_num_attention_heads=4), "generator_hidden_size 30 is not divisible"),
    (dict(generator_hidden_size=256), "larger than the discriminator"),
    (dict(vocab_size=5), "special tokens"),
    (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
    (dict(mask_token_id=9000), "special token ids"),
])
def test_invalid_model_configs(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(ElectraConfig(), **changes).validate()


def test_invalid_train_configs():
    with pytest.raises(ConfigError, match="exceeds max_position_embeddings"):
        TrainConfig(seq_len=1024).validate(ElectraConfig())
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0).validate()


def test_override_coerces_and_rejects():
    m = override(ElectraConfig(), {"hidden_size": "64", "mask_prob": "0.2"})
    assert m.hidden_size == 64 and m.mask_prob == 0.2
    with pytest.raises(ConfigError, match="unknown ElectraConfig field"):
        override(ElectraConfig(), {"hiden": 1})
    with pytest.raises(ConfigError, match="must be int"):
        override(ElectraConfig(), {"hidden_size": 1.5})
    with pytest.raises(ConfigError, match="not valid JSON"):
        from_json("{")


def test_objective_is_validated_and_saved():
    assert TrainConfig().objective == "electra"  # a config.json from before the field existed reads as ELECTRA
    assert from_json('{"train": {"steps": 7}}')[1].objective == "electra"
    m, t = ElectraConfig(), override(TrainConfig(), {"objective": "mlm"})
    assert from_json(to_json(m, t))[1].objective == "mlm"
    with pytest.raises(ConfigError, match="objective must be one of electra, mlm, got 'bert'"):
        TrainConfig(objective="bert").validate()
