"""The gradient-conflict probe: finite cosines for MoDE and the coupled MoE-LoRA, nothing detached
(ψ sees the text loss through attention), and clear errors for inputs it cannot measure."""

from __future__ import annotations

import math

import pytest
import torch

from strata.adapters import modality_lora as ml
from strata.config import AdapterSpec
from strata.data.benchmark import generate_task
from strata.eval.conflict import conflict_report, conflict_table, probe
from strata.strategies.mode import MoDEConfig

OPTS = MoDEConfig(experts=2, rank=4, reference_rows=8, kd_batch=2)


@pytest.fixture(scope="module")
def result(test_spec, backbone_dir) -> dict:
    table = generate_task("colour", 0, n_train=12, n_val=4, n_test=0)
    return probe(test_spec, backbone_dir, table, OPTS, steps=3, seed=0, batch_size=4, rows=4)


def test_probe_reports_both_kinds_with_finite_cosines(result: dict) -> None:
    assert set(result["mode"]["groups"]) == {"phi", "psi"}
    assert set(result["coupled"]["groups"]) == {"moe"}  # the coupled baseline has no ψ
    assert result["setup"]["steps"] == 3 and result["setup"]["rows"] == 4
    for kind in ("mode", "coupled"):
        rep = result[kind]
        assert rep["rows"] == 4 and rep["loss_text"] > 0 and rep["loss_image"] > 0
        for s in rep["groups"].values():
            assert s["both"] > 0
            assert s["both"] + s["text_only"] + s["image_only"] + s["neither"] == s["params"]
            for key in ("cos_mean", "cos_min", "cos_max", "frac_negative", "cos_group", "cross_ratio"):
                assert math.isfinite(s[key]), (kind, key, s[key])
            assert -1 <= s["cos_min"] <= s["cos_mean"] <= s["cos_max"] <= 1
            assert 0 <= s["frac_negative"] <= 1


def test_nothing_is_detached(result: dict) -> None:
    psi, phi = result["mode"]["groups"]["psi"], result["mode"]["groups"]["phi"]
    # Text positions attend to image positions, so the text loss reaches the V-Adapter ...
    assert psi["norm_text"] > 0 and psi["cross_ratio"] > 0
    # ... and image positions attend to the prompt's leading text tokens, so L_image reaches ϕ.
    assert phi["norm_image"] > 0
    assert result["coupled"]["groups"]["moe"]["norm_image"] > 0


def test_conflict_table_has_a_row_per_group(result: dict) -> None:
    table = conflict_table(result)
    assert table.row_count == 3
    assert list(table.columns[1].cells) == ["phi", "psi", "moe"]
    assert conflict_table(result["coupled"]).row_count == 1
    with pytest.raises(ValueError, match="not a conflict report"):
        conflict_table({"setup": {}})


def test_bad_inputs_are_refused(backbone, test_spec, backbone_dir) -> None:
    model, processor = backbone
    ml.attach(model, ml.ModalityLoRAConfig.from_options(OPTS, AdapterSpec()))
    rows = generate_task("colour", 0, n_train=2, n_val=0, n_test=0)
    with pytest.raises(ValueError, match="does not match"):
        conflict_report(model, processor, rows, "coupled")
    with pytest.raises(ValueError, match="kind must be one of"):
        conflict_report(model, processor, rows, "moe")
    with pytest.raises(ValueError, match="kd_weight"):
        conflict_report(model, processor, rows, "mode", kd_weight=0.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        probe(test_spec, backbone_dir, rows, OPTS, steps=0)


def test_report_leaves_a_frozen_model_frozen(backbone) -> None:
    model, processor = backbone
    ml.attach(model, ml.ModalityLoRAConfig(experts=2, rank=4, coupled=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ml.phi(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            p.requires_grad_(False)  # as a frozen load (load_eval) leaves it
    rep = conflict_report(model, processor, generate_task("colour", 0, n_train=2, n_val=0, n_test=0), "coupled")
    assert math.isfinite(rep["groups"]["moe"]["cos_mean"])
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
