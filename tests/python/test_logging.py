"""Logging and repr: the "epmoe" logger hierarchy sees rebalances, EP setup and capacity overflow with rank prefixes;
the library prints nothing; repr(MoE) shows the layer's shape and EP layout."""

from __future__ import annotations

import io
import logging

import epmoe
import torch
from ep_harness import run_ranks
from epmoe import _logging


def _layer(**overrides):
    cfg = dict(hidden_size=16, moe_intermediate_size=8, num_experts=4, top_k=1, num_redundant_experts=4,
               eplb_window=2)
    return epmoe.MoE(epmoe.MoEConfig(**{**cfg, **overrides}))


def test_caplog_sees_the_rebalance(caplog):
    moe = _layer()
    with torch.no_grad():
        moe(torch.randn(32, 16) + 3 * moe.gate_weight.detach()[0])
    caplog.set_level(logging.INFO, logger="epmoe")
    stats = moe.rebalance()
    records = [r for r in caplog.records if r.name == "epmoe.layer" and "EPLB rebalance" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    message = records[0].getMessage()
    assert message.startswith("layer 0: EPLB rebalance") and f"{stats['balancedness_before']:.4f}" in message
    assert records[0].rank == -1 and records[0].world_size == 0  # outside torch.distributed: no rank prefix


def test_library_prints_nothing(capsys):
    moe = _layer()
    with torch.no_grad():
        moe(torch.randn(8, 16))
    moe.rebalance()
    logging.getLogger("epmoe.layer").warning("a warning nobody configured a handler for")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # NullHandler: no "last resort" output on stderr


def test_configure_formats_package_records():
    stream = io.StringIO()
    handler = _logging.configure("INFO", stream=stream)
    try:
        _logging.get_logger("epmoe.test").info("hello %d", 3)
        _logging.get_logger("elsewhere").debug("hidden")
        assert stream.getvalue().strip().endswith("INFO epmoe.test: hello 3")
        assert "hidden" not in stream.getvalue()
        assert _logging.configure("WARNING", stream=stream) is not handler  # replaced, not stacked
        assert sum(getattr(h, "_epmoe_cli", False) for h in logging.getLogger("epmoe").handlers) == 1
    finally:
        for h in list(logging.getLogger("epmoe").handlers):
            if getattr(h, "_epmoe_cli", False):
                _logging.unconfigure(h)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelname, record.name, record.getMessage()))


def _ranks(rank, world):
    handler = _Collect()
    logger = logging.getLogger("epmoe")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    moe = _layer()
    with torch.no_grad():
        moe(torch.randn(32, 16) + 3 * moe.gate_weight.detach()[0])
    moe.rebalance()
    ep = epmoe.EPGroup(timeout=20)
    x, w = torch.randn(6, 4), torch.ones(6, 1)
    idx = torch.full((6, 1), 1 - rank, dtype=torch.int32)  # every token to the other rank
    d = ep.dispatch(x, idx, w, 2, mode="capacity", capacity=4, drop_overflow=True)
    ep.combine(d.recv_x, d.handle)
    return handler.records, repr(moe)


def test_rank_prefixes_setup_rebalance_and_overflow():
    for rank, (records, text) in run_ranks(_ranks, 2, timeout=90).items():
        prefix = f"[rank {rank}/2] "
        assert records and all(message.startswith(prefix) for _, _, message in records), records
        messages = {name: [m for _, n, m in records if n == name] for name in ("epmoe.ep", "epmoe.layer")}
        assert any(f"EP group: rank {rank} of 2, backend gloo" in m for m in messages["epmoe.ep"]), records
        assert any("EPLB rebalance" in m for m in messages["epmoe.layer"]), records
        overflow = [(level, m) for level, n, m in records if "overflow" in m]
        assert overflow and overflow[0][0] == "WARNING" and "dropped" in overflow[0][1], records
        assert f"ep_size=2, ep_rank={rank}, num_local_slots=4" in text


def test_repr_shows_the_layer():
    text = repr(_layer(num_shared_experts=1, exchange_mode="exact", dtype=torch.bfloat16))
    first = text.splitlines()[1].strip()
    for field in ("num_experts=4", "top_k=1", "ep_size=1", "ep_rank=0", "num_local_slots=8",
                  "num_redundant_experts=4", "dtype=bfloat16", "exchange_mode='exact'", "replica_policy="):
        assert field in first, first
    assert "(shared_experts)" in text
