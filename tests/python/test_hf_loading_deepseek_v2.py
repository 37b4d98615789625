"""`from_pretrained` / `save_pretrained` with DeepseekV2 checkpoints (greedy and group-limited top-k), which shards a
rank opens, and the index of a one-file save.

DeepseekV2 checkpoints (transformers' per-expert hub layout and the fused 3-D layout) load on 2 gloo ranks with and
without redundant experts with plain transformers' logits and only the rank's distinct experts read; saved at EP=2
they load in plain transformers with no missing or unexpected keys and bitwise the same logits. With one shard per
expert, a rank opens only the shards of its own experts and of the non-expert tensors (the index's weight map).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from ep_harness import run_ranks

transformers = pytest.importorskip("transformers")

from epmoe.integrations.transformers import from_pretrained, save_pretrained  # noqa: E402
from test_hf_loading import check_matches, moe_layers, random_model, rank_ids, write_renamed_hub_checkpoint  # noqa: E402
from test_transformers_experts import deepseek_v2_config  # noqa: E402

V2 = {
    "greedy": lambda: deepseek_v2_config(topk_method="greedy"),
    "group_limited_greedy": lambda: deepseek_v2_config(topk_method="group_limited_greedy", n_group=2, topk_group=1),
}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def one_shard_per_expert(name: str) -> int:
    """Shard 0: every non-expert tensor; shard 1 + e: the three tensors of expert e (one MoE layer)."""
    match = _EXPERT.search(name)
    return 0 if match is None else 1 + int(match.group(1))


@pytest.fixture(scope="module")
def v2_checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deepseek_v2")
    for kind, make in V2.items():
        model = random_model(make())
        assert type(model.model.layers[1].mlp).__name__ == "DeepseekV2Moe"
        model.save_pretrained(str(root / f"{kind}-hub"), max_shard_size="100KB")
        model.save_pretrained(str(root / f"{kind}-fused"), save_original_format=False)
    write_renamed_hub_checkpoint(random_model(V2["greedy"]()), root / "per-expert-shards", num_shards=9,
                                 shard_of=one_shard_per_expert)
    return root


def _ep2(rank, world, root, work):
    import safetensors

    root, work = Path(root), Path(work)
    for folder in sorted(root.iterdir()):
        for redundant in (0, 2):
            model = from_pretrained(str(folder), num_redundant_experts=redundant)
            check_matches(folder, model, rank)
        if folder.name.endswith("-hub"):
            save_pretrained(model, str(work / folder.name))
    # Which shards this rank opens: the non-expert one and those of its own experts, no other.
    opened, safe_open = [], safetensors.safe_open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return safe_open(path, *args, **kwargs)

    safetensors.safe_open = spy
    try:
        folder = root / "per-expert-shards"
        model = from_pretrained(str(folder), num_redundant_experts=2)
    finally:
        safetensors.safe_open = safe_open
    check_matches(folder, model, rank)
    (moe,) = moe_layers(model)
    expected = {0} | {1 + e for e in moe.local_slot_experts().tolist()}
    return {"opened": sorted(opened), "expected": sorted(f"model-{i + 1:05d}-of-00009.safetensors" for i in expected)}


def test_deepseek_v2_loads_and_saves_expert_parallel_and_opens_only_its_shards(v2_checkpoints, tmp_path):
    results = run_ranks(_ep2, 2, str(v2_checkpoints), str(tmp_path), timeout=180)
    for rank, result in results.items():
        assert result["opened"] == result["expected"], (rank, result)  # each opened once, only those needed
    assert results[0]["opened"] != results[1]["opened"]
    for kind in V2:
        original = transformers.AutoModelForCausalLM.from_pretrained(str(v2_checkpoints / f"{kind}-hub")).eval()
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{kind}-hub"),
                                                                        output_loading_info=True)
        assert not any(info.values()), info
        ids = rank_ids(0)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0)


def test_single_process_save_writes_an_index(v2_checkpoints, tmp_path):
    folder = v2_checkpoints / "greedy-fused"
    save_pretrained(from_pretrained(str(folder), num_redundant_experts=1), str(tmp_path / "out"))
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info.values()), info
    check_matches(tmp_path / "out", from_pretrained(str(tmp_path / "out")), 0, reference_folder=folder)


def test_torchrun_without_a_process_group_warns(v2_checkpoints, caplog, monkeypatch):
    # Launched as 2 ranks but torch.distributed never initialised: each process would hold every expert.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING, logger="epmoe.integrations.transformers"):
        model = from_pretrained(str(v2_checkpoints / "greedy-fused"))
    assert "torch.distributed is not initialised" in caplog.text and "init_process_group()" in caplog.text
    assert moe_layers(model)[0].num_ranks == 1
