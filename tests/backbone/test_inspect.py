"""`strata backbone inspect`: family, parts, adapter targets and QLoRA, from a config alone; refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import transformers
from family_models import CONFIGS
from rich.console import Console
from typer.testing import CliRunner

from strata import cli


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=400, no_color=True))


def inspect(*args: str) -> tuple[int, str]:
    """Exit code and output with rich's table borders dropped and whitespace collapsed."""
    result = CliRunner().invoke(cli.app, ["backbone", "inspect", *map(str, args)])
    return result.exit_code, " ".join(re.sub(r"[\u2500-\u257f]", " ", result.output).split())


def saved_config(tmp_path: Path, model_type: str) -> Path:
    CONFIGS[model_type]().save_pretrained(tmp_path)  # a config alone: inspect reads no weights
    return tmp_path


def test_a_qwen2_5_vl_checkpoint_is_inspected_from_its_config(tmp_path: Path) -> None:
    code, out = inspect(saved_config(tmp_path, "qwen2_5_vl"), "--placement", "language_only")
    assert code == 0, out
    assert "family qwen2.5-vl (Qwen2_5_VLForConditionalGeneration)" in out
    assert "adapter: lora, placement language_only" in out
    assert "vision 0 —" in out  # the vision MLP's gate/up/down_proj are not the LM's
    assert "language 21 down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in out
    assert "trainable:" in out and "QLoRA (backbone.quantization: 4bit): applies" in out
    assert "stay in full precision: lm_head, model.visual" in out
    assert "adapter kind 'prefix' is refused on this family: PEFT lengthens the attention mask" in out
    code, out = inspect(tmp_path, "--kind", "prefix", "--placement", "language_only")
    assert code != 0 and "'prefix' does not work on the qwen2.5-vl family" in out


def test_the_builtin_backbone_reports_what_training_trains() -> None:
    code, out = inspect("builtin:test", "--kind", "bitfit", "--placement", "vision_only")
    assert code == 0, out
    assert "family llava" in out and "language 0" in out
    trainable = int(re.search(r"trainable: ([\d,]+) of", out).group(1).replace(",", ""))
    assert 0 < trainable < 5000  # BitFit trains the vision side's biases only


def test_remote_code_unsupported_and_bad_overrides_are_refused(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    saved_config(remote, "internvl")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_internvl.Model"}}))
    code, out = inspect(remote)
    assert code == 1 and "trust_remote_code" in out and "-hf" in out
    other = tmp_path / "blip"
    transformers.Blip2Config().save_pretrained(other)
    code, out = inspect(other)
    assert code == 1 and "unsupported backbone architecture 'blip-2'" in out and "qwen2_vl" in out
    code, out = inspect("builtin:test", "--placement", "everywhere")
    assert code == 1 and "adapter.placement must be one of" in out
