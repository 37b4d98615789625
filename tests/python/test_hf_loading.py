"""`epmoe.integrations.transformers.from_pretrained` / `save_pretrained` against plain transformers, on gloo ranks.

Checkpoints are generated from tiny random DeepseekV3, Qwen3-MoE (tied embeddings) and Mixtral models with
transformers' own `save_pretrained`: its default per-expert hub layout (sharded, with an index) and the fused 3-D
layout (`save_original_format=False`), plus a per-expert checkpoint written here by renaming the fused tensors the
way hub checkpoints name them. Loaded on 2 and 4 ranks with and without redundant experts, the EP model's logits
equal the plain transformers model's and each rank reads only its distinct experts' bytes; a saved EP model loads
in plain transformers with no missing or unexpected keys and the same logits, and in epmoe at another EP size; a
whole model's `state_dict()` goes through torch.distributed.checkpoint from EP=2 to EP=4.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from ep_harness import run_ranks

transformers = pytest.importorskip("transformers")

from epmoe import eplb  # noqa: E402
from epmoe.integrations.transformers import from_pretrained, save_pretrained, shard_model  # noqa: E402
from epmoe.layer import MoE  # noqa: E402
from test_transformers_experts import deepseek_v3_config, mixtral_config, qwen3_moe_config  # noqa: E402

CONFIGS = {
    "deepseek_v3": lambda: deepseek_v3_config(),
    "qwen3_moe": lambda: qwen3_moe_config(tie_word_embeddings=True),
    "mixtral": lambda: mixtral_config(num_key_value_heads=2),
}
VOCAB = 96


def random_model(kind):
    """A tiny model of `kind` (a key of CONFIGS, or a transformers config) with every tensor random (seeded),
    routers and biases included."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]() if isinstance(kind, str) else kind)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "norm" in name else 0.5 if name.endswith("gate.weight") else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name else 0.0))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.rand(module.e_score_correction_bias.shape, generator=gen))
    return model.eval()


def write_renamed_hub_checkpoint(model, folder: Path, num_shards: int = 3, edit=None, shard_of=None) -> None:
    """Writes `model` as a hub checkpoint would store it, by hand: per-expert `experts.{e}.{gate,up,down}_proj`
    tensors split from the fused in-memory ones, over `num_shards` files with a `model.safetensors.index.json`
    (tensor i of the sorted names in shard i % num_shards, or in shard `shard_of(name)`).
    `edit(tensors)` may change the name -> tensor dict before it is written (to break the checkpoint)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                base = name.removesuffix("gate_up_proj") + f"{e}."
                tensors[base + "gate_proj.weight"] = t[e, :inter].clone()
                tensors[base + "up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                tensors[name.removesuffix("down_proj") + f"{e}.down_proj.weight"] = t[e].clone()
        else:
            tensors[name] = t.clone()
    if edit is not None:
        edit(tensors)
    folder.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    order = {name: i for i, name in enumerate(names)}
    shard_of = shard_of or (lambda name: order[name] % num_shards)
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names if shard_of(n) == i}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_checkpoints")
    for kind in CONFIGS:
        model = random_model(kind)
        model.save_pretrained(str(root / f"{kind}-hub"), max_shard_size="100KB")
        model.save_pretrained(str(root / f"{kind}-fused"), save_original_format=False)
    write_renamed_hub_checkpoint(random_model("deepseek_v3"), root / "deepseek_v3-renamed")
    return root


def rank_ids(rank: int, salt: int = 0) -> torch.Tensor:
    """Per-rank token ids; ranks get different lengths."""
    return torch.randint(0, VOCAB, (2, 5 + rank), generator=torch.Generator().manual_seed(100 * salt + rank))


def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


_REFERENCE: dict[tuple[str, int], torch.Tensor] = {}


def reference_logits(folder: Path, rank: int) -> torch.Tensor:
    """Logits of plain transformers on the checkpoint in `folder` for this rank's ids (cached per process)."""
    key = (str(folder), rank)
    if key not in _REFERENCE:
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            _REFERENCE[key] = ref(input_ids=rank_ids(rank)).logits
    return _REFERENCE[key]


def check_matches(folder: Path, model, rank: int, reference_folder: Path | None = None) -> None:
    """`model` (EP) gives the logits of plain transformers on `reference_folder` (default `folder`); its load stats
    count exactly this rank's distinct experts."""
    with torch.no_grad():
        got = model(input_ids=rank_ids(rank)).logits
    torch.testing.assert_close(got, reference_logits(reference_folder or folder, rank), rtol=1e-5, atol=1e-5,
                               msg=str(folder))
    layers = moe_layers(model)
    num_layers, num_experts = moe_shape(folder)
    assert len(layers) == num_layers and layers[0].config.num_experts == num_experts
    cfg = layers[0].config
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # fp32 checkpoints
    distinct = sum(len(set(m.local_slot_experts().tolist())) for m in layers)
    stats = model.epmoe_load_stats
    assert stats["expert_bytes_read"] == distinct * per_expert, (folder.name, stats)
    assert stats["expert_bytes_total"] == num_layers * num_experts * per_expert
    assert stats["other_bytes_read"] > 0 and stats["seconds"] > 0
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@functools.cache
def moe_shape(folder: Path) -> tuple[int, int]:
    """(number of MoE layers, experts per layer) of the checkpoint in `folder`, from its config."""
    from epmoe.integrations.hf_load import find_moe_blocks

    config = transformers.AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        blocks = find_moe_blocks(transformers.AutoModelForCausalLM.from_config(config))
    return len(blocks), int(blocks[0][1].experts.gate_up_proj.shape[0])


def load_everything(rank: int, world: int, root: Path) -> int:
    """Every checkpoint in `root`, with the fewest redundant experts EP needs and with `world` more."""
    folders = sorted(root.iterdir())
    for folder in folders:
        auto = eplb.num_redundant_auto(moe_shape(folder)[1], world)
        for redundant in (auto, auto + world):
            model = from_pretrained(str(folder), num_redundant_experts=redundant)
            assert all(m.config.num_redundant_experts == redundant for m in moe_layers(model))
            assert all(m.num_ranks == world for m in moe_layers(model))
            check_matches(folder, model, rank)
    return len(folders)


def check_placements(rank: int, folder: Path, plan_file: Path, sglang_file: Path) -> list:
    """from_pretrained(placement=...) with an `epmoe plan` JSON file, a Placement, a JSON dict and SGLang's map;
    returns the slot map each load installed (the logits must match every time)."""
    plan = eplb.Placement.load(plan_file)
    installed = []
    for source in (str(plan_file), plan, json.loads(plan_file.read_text()), str(sglang_file)):
        model = from_pretrained(str(folder), placement=source)
        (moe,) = moe_layers(model)
        installed.append(moe.placement.phy2log.tolist())
        check_matches(folder, model, rank)
    return installed


def save_all(world: int, root: Path, out: Path) -> None:
    """Each `*-hub` checkpoint loaded with redundant experts in a skewed placement, saved to `out/<kind>`."""
    for kind in CONFIGS:
        folder = root / f"{kind}-hub"
        num_layers, num_experts = moe_shape(folder)
        load = torch.arange(1, num_experts + 1, dtype=torch.float64).repeat(num_layers, 1)
        slots = num_experts + eplb.num_redundant_auto(num_experts, world) + world
        model = from_pretrained(str(folder), placement=eplb.plan(load, slots, world))
        assert max(int(m.placement.logcnt.max()) for m in moe_layers(model)) > 1
        save_pretrained(model, str(out / kind), max_shard_size="50KB")
    # A whole model sharded in place saves the same way.
    model = shard_model(random_model("mixtral"), num_redundant_experts="auto")
    save_pretrained(model, str(out / "mixtral-shard_model"))


def check_generate(rank: int, folder: Path) -> list:
    """Greedy generation of the EP model equals plain transformers' (every rank runs the same number of steps:
    each forward is collective)."""
    ids = rank_ids(rank)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    model = from_pretrained(str(folder), num_redundant_experts=2)
    steps = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    expected = ref.generate(ids, **steps)
    got = model.generate(ids, **steps)
    assert torch.equal(got, expected), (got, expected)
    return got.tolist()


def _ep2(rank, world, root, work):
    root, work = Path(root), Path(work)
    check_generate(rank, root / "qwen3_moe-hub")
    loaded = load_everything(rank, world, root)
    installed = check_placements(rank, root / "deepseek_v3-hub", work / "plan.json", work / "sglang.json")
    save_all(world, root, work / "saved")
    model = from_pretrained(str(root / "deepseek_v3-hub"), num_redundant_experts=2)
    dcp.save(model.state_dict(), checkpoint_id=str(work / "dcp"))  # loaded at EP=4 by _ep4
    return {"loaded": loaded, "placements": installed}


@pytest.fixture(scope="module")
def ep2_run(checkpoints, tmp_path_factory):
    """One 2-rank run: every checkpoint loaded, the plans, and the saves (into `work/saved`)."""
    work = tmp_path_factory.mktemp("ep2")
    eplb.plan(torch.tensor([[9.0, 1, 1, 5, 1, 1, 1, 7]]), 12, 2).save(work / "plan.json")
    sglang = {"physical_to_logical_map": [list(range(8)) + [0, 1, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0, 7, 0, 6, 1]]}
    (work / "sglang.json").write_text(json.dumps(sglang))
    counts = run_ranks(_ep2, 2, str(checkpoints), str(work), timeout=240)
    return work, counts


def test_from_pretrained_matches_transformers_ep2(ep2_run):
    _, results = ep2_run
    assert [r["loaded"] for r in results.values()] == [2 * len(CONFIGS) + 1] * 2


def test_from_pretrained_starts_from_a_saved_plan(ep2_run):
    work, results = ep2_run
    plan = eplb.Placement.load(work / "plan.json").phy2log.tolist()
    # SGLang's map has one row per decoder layer (the dense layer 0 included): the MoE layer 1 takes row 1.
    sglang_row = json.loads((work / "sglang.json").read_text())["physical_to_logical_map"][1]
    for installed in (r["placements"] for r in results.values()):
        assert installed == [plan, plan, plan, [sglang_row]]


def test_save_pretrained_loads_in_transformers(checkpoints, ep2_run):
    out = ep2_run[0] / "saved"
    for kind in CONFIGS:
        folder = out / kind
        files = sorted(p.name for p in folder.iterdir())
        assert "config.json" in files and "model.safetensors.index.json" in files, files
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        original = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints / f"{kind}-hub")).eval()
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        # The hub names of transformers' own save, each tensor once (no epmoe names, no duplicates).
        with open(checkpoints / f"{kind}-hub" / "model.safetensors.index.json") as f:
            assert set(index) == set(json.load(f)["weight_map"])
        original_state = original.state_dict()
        for name, p in model.state_dict().items():
            torch.testing.assert_close(p, original_state[name], rtol=0, atol=0, msg=name)
        ids = rank_ids(0)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out / "mixtral-shard_model"),
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = random_model("mixtral")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0)


def _ep4(rank, world, root, work):
    root, work = Path(root), Path(work)
    loaded = load_everything(rank, world, root)
    for kind in CONFIGS:  # the EP=2 saves of from_pretrained models, at EP=4
        folder = work / "saved" / kind
        model = from_pretrained(str(folder), num_redundant_experts="auto")
        check_matches(folder, model, rank, reference_folder=root / f"{kind}-hub")
    # The EP=2 distributed checkpoint of a whole model, into zeroed weights at EP=4 with another redundancy.
    folder = root / "deepseek_v3-hub"
    model = from_pretrained(str(folder), num_redundant_experts=4)
    with torch.no_grad():
        for tensor in [*model.parameters(), *(m.e_score_correction_bias for m in moe_layers(model))]:
            tensor.zero_()
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(work / "dcp"))
    model.load_state_dict(state)
    check_matches(folder, model, rank)
    return loaded


def test_from_pretrained_matches_transformers_ep4_and_loads_ep2_saves(checkpoints, ep2_run):
    counts = run_ranks(_ep4, 4, str(checkpoints), str(ep2_run[0]), timeout=240)
    assert set(counts.values()) == {2 * len(CONFIGS) + 1}


def test_from_pretrained_single_process_logs_stats(checkpoints, caplog, monkeypatch):
    folder = checkpoints / "mixtral-fused"
    with caplog.at_level(logging.INFO, logger="epmoe.integrations.transformers"):
        model = from_pretrained(str(folder), num_redundant_experts=3)
    check_matches(folder, model, 0)
    assert "from_pretrained" in caplog.text and "GB of expert weights" in caplog.text
    assert moe_layers(model)[0].w13.shape[0] == 8  # one process holds every slot, replicas included
    # Fused rows read in runs of consecutive experts; capped runs (here one expert each) read the same.
    from epmoe.integrations import hf_load

    monkeypatch.setattr(hf_load, "_MAX_READ", 1)
    check_matches(folder, from_pretrained(str(folder), num_redundant_experts=3), 0)


def test_imports_have_no_cycle():
    # A fresh interpreter: the layer imports no integration; the deepest integration module imports first; the
    # public names resolve from epmoe.integrations.transformers.
    code = (
        "import sys, epmoe.layer\n"
        "assert not [m for m in sys.modules if m.startswith('epmoe.integrations')]\n"
        "import epmoe.integrations.hf_save as hf_save\n"
        "from epmoe.integrations.transformers import from_pretrained, save_pretrained, shard_model\n"
        "assert save_pretrained is hf_save.save_pretrained and from_pretrained.__module__.endswith('hf_load')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
    # The integration first: its lazy names resolve, and the layer's from_hf reaches it.
    code = (
        "import epmoe.integrations.transformers as t\n"
        "from epmoe.integrations import hf_load, hf_save\n"
        "assert t.from_pretrained is hf_load.from_pretrained and t.save_pretrained is hf_save.save_pretrained\n"
        "import epmoe\n"
        "assert epmoe.MoE is t.MoE\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
