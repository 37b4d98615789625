"""Bad input to `from_pretrained` (and `save_pretrained`): a clear error naming the file, tensor or field, raised on
every rank (also when only one rank can see the problem) before any weight is allocated; nothing half-loaded is
returned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ep_harness import run_ranks

transformers = pytest.importorskip("transformers")

from epmoe import eplb  # noqa: E402
from epmoe.integrations.transformers import from_pretrained  # noqa: E402
from test_hf_loading import random_model, write_renamed_hub_checkpoint  # noqa: E402

# Tiny DeepseekV3 (see test_hf_loading): one MoE layer (model.layers.1.mlp) of 8 experts, H=64, I=32.
EXPERTS = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "deepseek_v3"
    random_model("deepseek_v3").save_pretrained(str(folder))
    return folder


def broken(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_renamed_hub_checkpoint(random_model("deepseek_v3"), folder, num_shards=2, edit=edit)
    return folder


def test_path_is_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        from_pretrained(str(tmp_path / "nowhere"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        from_pretrained(str(tmp_path))


def test_folder_without_weights(good, tmp_path):
    (tmp_path / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(ValueError, match="has no model.safetensors or model.safetensors.index.json"):
        from_pretrained(str(tmp_path))


def test_index_naming_a_missing_shard(good, tmp_path):
    (tmp_path / "config.json").write_text((good / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-0001.safetensors"}}))
    with pytest.raises(ValueError, match="model-0001.safetensors"):
        from_pretrained(str(tmp_path))


def test_unsupported_moe_block_is_named(tmp_path):
    config = transformers.Qwen2MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported MoE block Qwen2MoeSparseMoeBlock"):
        from_pretrained(str(tmp_path))


def test_quantized_checkpoint_is_refused(good, tmp_path):
    config = json.loads((good / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    for f in good.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="quantized checkpoints \\(fp8\\)"):
        from_pretrained(str(tmp_path))


def test_bad_dtype_and_device(good):
    with pytest.raises(ValueError, match="torch_dtype"):
        from_pretrained(str(good), torch_dtype="float7")
    with pytest.raises(ValueError, match="device_map"):
        from_pretrained(str(good), device_map="auto")


def test_missing_expert_tensor(tmp_path):
    folder = broken(tmp_path, lambda t: t.pop(f"{EXPERTS}.5.up_proj.weight"))
    with pytest.raises(ValueError, match=f"lacks the expert tensor '{EXPERTS}.5.up_proj.weight'"):
        from_pretrained(str(folder))


def test_missing_fused_expert_tensor(tmp_path):
    # The fused layout with one of its two tensors gone: the missing one is named.
    from safetensors.torch import load_file, save_file

    fused = tmp_path / "fused"
    random_model("deepseek_v3").save_pretrained(str(fused), save_original_format=False)
    tensors = load_file(str(fused / "model.safetensors"))
    tensors.pop(f"{EXPERTS}.down_proj")
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"has the fused expert tensor '{EXPERTS}.gate_up_proj' but lacks "
                                         f"'{EXPERTS}.down_proj'"):
        from_pretrained(str(fused))


def test_missing_non_expert_tensor(tmp_path):
    folder = broken(tmp_path, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight"))
    with pytest.raises(ValueError, match="lacks the tensor 'model.layers.0.self_attn.o_proj.weight'"):
        from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.1.mlp.gate.weight",
                                  "model.layers.1.mlp.shared_experts.up_proj.weight"])
def test_wrong_shape_is_named(tmp_path, name):
    def edit(tensors):
        tensors[name] = tensors[name][..., :-1].contiguous()

    with pytest.raises(ValueError, match=f"'{name}' has shape"):
        from_pretrained(str(broken(tmp_path, edit)))


def test_placement_for_another_model_or_ep_size(good, tmp_path):
    six = eplb.plan(torch.ones(1, 6), 6, 1)
    six.save(tmp_path / "six.json")
    with pytest.raises(ValueError, match="'num_logical_experts' is 6, expected 8"):
        from_pretrained(str(good), placement=str(tmp_path / "six.json"))
    with pytest.raises(ValueError, match="placement.num_ranks is 2, expected 1"):
        from_pretrained(str(good), placement=eplb.plan(torch.ones(1, 8), 8, 2))
    with pytest.raises(ValueError, match="placement.num_experts is 6, expected 8"):
        from_pretrained(str(good), placement=six)
    with pytest.raises(ValueError, match="placement has 3 layers; the model has 1 MoE layers \\(2 decoder layers\\)"):
        from_pretrained(str(good), placement=eplb.plan(torch.ones(3, 8), 8, 1))
    with pytest.raises(ValueError, match="num_redundant_experts=1, but the placement has 10 slots"):
        from_pretrained(str(good), num_redundant_experts=1, placement=eplb.plan(torch.ones(1, 8), 10, 1))
    (tmp_path / "bad.json").write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3, 4, 5, 6, 9]]}))
    with pytest.raises(ValueError, match="phy2log values must lie in \\[0, 8\\)"):
        from_pretrained(str(good), placement=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "junk.json").write_text("{")
        from_pretrained(str(good), placement=str(tmp_path / "junk.json"))


def _expect_errors(rank, world, cases):
    """Every case must raise on this rank too; returns [(exception type, message)] (None: a model came back)."""
    out = []
    for folder, placement_ranks in cases:
        placement = None if placement_ranks is None else eplb.plan(torch.ones(1, 8), 8, placement_ranks)
        try:
            from_pretrained(folder, placement=placement)
            out.append(None)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out.append((type(exc).__name__, str(exc)))
    return out


def test_errors_raise_on_every_rank(tmp_path, good):
    # An expert only rank 1 holds at EP=2 (default placement): only rank 1 reads, and checks, its header.
    expert = int(eplb.plan(torch.ones(1, 8), 8, 2).phy2log[0, -1])
    name = f"{EXPERTS}.{expert}.down_proj.weight"

    def wrong_shape(tensors):
        tensors[name] = torch.zeros(64, 31)

    cases = [
        (broken(tmp_path / "missing", lambda t: t.pop(name)), None, f"lacks the expert tensor '{name}'"),
        (broken(tmp_path / "shape", wrong_shape), None, f"'{name}' has shape [64, 31], expected [64, 32]"),
        (good, 4, "placement.num_ranks is 4, expected 2"),
    ]
    results = run_ranks(_expect_errors, 2, [(str(f), r) for f, r, _ in cases], timeout=120)
    for rank in (0, 1):
        for (_, _, expected), got in zip(cases, results[rank], strict=True):
            assert got is not None, f"rank {rank} returned a model"
            assert got[0] == "ValueError" and expected in got[1], (rank, got)
    assert "failed on EP rank 1" in results[0][1][1]  # rank 0 never read that header: it learnt it from rank 1


def test_save_pretrained_bad_input(good, tmp_path):
    from epmoe.integrations.transformers import save_pretrained
    from epmoe.layer import MoE, MoEConfig

    with pytest.raises(ValueError, match="has no epmoe.MoE layer"):
        save_pretrained(torch.nn.Linear(2, 2), str(tmp_path / "out"))
    layer = torch.nn.Sequential(MoE(MoEConfig(hidden_size=8, moe_intermediate_size=4, num_experts=2, top_k=1)))
    with pytest.raises(ValueError, match="was not built from a transformers block"):
        save_pretrained(layer, str(tmp_path / "out"))
    model = from_pretrained(str(good))
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(model, str(tmp_path / "out"), max_shard_size="lots")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        save_pretrained(model, str(tmp_path / "file"))
    assert not (tmp_path / "out").exists()  # nothing written on bad input
