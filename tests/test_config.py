import json

import pytest

from dsv4.config import ConfigError, EngineConfig, ModelConfig


@pytest.mark.parametrize("name", ["tiny", "flash", "pro"])
def test_presets_are_valid(name):
    cfg = ModelConfig.preset(name)
    assert len(cfg.compress_ratios) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers


def test_published_sizes():
    flash, pro = ModelConfig.preset("flash"), ModelConfig.preset("pro")
    assert (flash.hidden_size, flash.num_hidden_layers, flash.num_attention_heads) == (4096, 43, 64)
    assert flash.compress_ratios == [0, 0] + [4, 128] * 20 + [4, 0]
    assert (pro.hidden_size, pro.num_hidden_layers, pro.n_routed_experts) == (7168, 61, 384)
    assert pro.compress_ratios == [128, 128] + [4, 128] * 29 + [4, 0]


def test_tiny_covers_every_attention_kind_and_routing():
    cfg = ModelConfig.preset("tiny")
    assert {0, 4, 128} <= set(cfg.compress_ratios[:cfg.num_hidden_layers])
    assert 0 < cfg.num_hash_layers < cfg.num_hidden_layers
    assert cfg.num_nextn_predict_layers >= 1


def test_round_trip_through_json(tmp_path):
    cfg = ModelConfig.preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_json(tmp_path) == cfg
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg


BAD = [
    ({"compress_ratios": [0, 4, 64, 4, 4]}, "compress_ratios[2]", "64"),
    ({"compress_ratios": [0, 4, 128, 4]}, "compress_ratios", "4 entries"),
    ({"head_dim": 64}, "head_dim", "64"),
    ({"num_hash_layers": 5}, "num_hash_layers", "5"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok", "9"),
    ({"scoring_func": "relu"}, "scoring_func", "relu"),
    ({"num_key_value_heads": 2}, "num_key_value_heads", "2"),
    ({"hidden_size": -1}, "hidden_size", "-1"),
    ({"o_groups": 3}, "o_groups", "3"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type", "linear"),
]


@pytest.mark.parametrize("change,key,value", BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_key_and_value(change, key, value):
    data = ModelConfig.preset("tiny").to_dict()
    data.update(change)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(data)
    assert key in str(e.value) and value in str(e.value), str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize("change,key", [
    (dict(dtype="float16"), "dtype"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(speculative_tokens=9), "speculative_tokens"), (dict(kv_cache_dtype="fp4"), "kv_cache_dtype"),
    (dict(cuda_graph_max_len=0), "cuda_graph_max_len")])
def test_bad_engine_config_names_the_setting(change, key):
    ec = EngineConfig(**change)
    with pytest.raises(ConfigError, match=key):
        ec.validate()
    EngineConfig().validate()  # the defaults (cuda_graph_max_len None: all of max_model_len)


def test_batched_tokens_default_follows_the_device(monkeypatch):
    """max_num_batched_tokens None: 8192 on a GPU of 70 GiB or more (vLLM's server default on
    H100 / H200), 2048 on smaller GPUs and the CPU; a value given is kept; < 1 is refused."""
    from types import SimpleNamespace

    import torch

    from dsv4.config import EngineConfig, resolved_batched_tokens, resolved_max_num_seqs
    assert EngineConfig().max_num_batched_tokens is None
    assert resolved_max_num_seqs(EngineConfig(), torch.device("cpu")) == 64
    assert resolved_max_num_seqs(EngineConfig(max_num_seqs=3), torch.device("cpu")) == 3
    assert resolved_batched_tokens(EngineConfig(), torch.device("cpu")) == 2048
    assert resolved_batched_tokens(EngineConfig(max_num_batched_tokens=96), torch.device("cpu")) == 96
    for gib, want in ((141, 8192), (80, 8192), (48, 2048)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda dev, g=gib: SimpleNamespace(total_memory=g * 2**30))
        assert resolved_batched_tokens(EngineConfig(), torch.device("cuda:0")) == want
        assert resolved_max_num_seqs(EngineConfig(), torch.device("cuda:0")) == (
            256 if want == 8192 else 64)
    with pytest.raises(ConfigError, match="max_num_batched_tokens 0: must be >= 1"):
        EngineConfig(max_num_batched_tokens=0).validate()
