"""The generic path: transformers' module tree classified into moekit's components, checked
against the native readers component by component, and its one-line errors."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from moekit.accounting import count_params  # noqa: E402
from moekit.config import ConfigError  # noqa: E402
from moekit.interop import hf_generic  # noqa: E402
from moekit.interop.hf_config import config_from_hf  # noqa: E402
from tests.interop.test_hf_config import SMALL  # noqa: E402

COMPARED = ("embedding", "attention", "norms", "routers", "shared_experts", "routed_experts", "lm_head")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_components_match_the_native_reader(model_type):
    d = SMALL[model_type]
    native = count_params(config_from_hf(d))
    generic = hf_generic.count_with_transformers(d).params
    for c in COMPARED:
        assert generic.breakdown.get(c, 0) == native.breakdown[c], c
    assert generic.total == native.total and generic.active == native.active
    assert generic.matmul_active == native.matmul_active


def test_a_config_without_top_k_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(hf_generic, "_TOP_K_KEYS", ("no_such_key",))
    with pytest.raises(ConfigError, match=r"has routed experts \(model\.layers\.0\..*\) but its config has no top-k"):
        hf_generic.count_with_transformers(SMALL["mixtral"])


def test_types_nobody_knows_and_dense_types_are_refused():
    with pytest.raises(ConfigError, match="neither moekit nor transformers .* knows it"):
        hf_generic.count_with_transformers({"model_type": "no_such_moe"})
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2': .* has no routed experts"):
        hf_generic.count_with_transformers({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2})


def test_a_config_transformers_cannot_build_is_one_line():
    with pytest.raises(ConfigError, match="transformers cannot build model_type 'mixtral'") as e:
        hf_generic.count_with_transformers(dict(SMALL["mixtral"], vocab_size=-5))
    assert "\n" not in str(e.value)
