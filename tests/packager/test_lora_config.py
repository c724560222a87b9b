"""A PEFT adapter_config.json is read by the schema layer: a bad one is refused in one line before any conversion."""

from __future__ import annotations

import json

import pytest

from edgepack.packager.convert_lora import WEIGHTS, convert
from edgepack.packager.errors import PackagerError


@pytest.mark.parametrize(("config", "message"), [
    (b"{not json", "adapter_config.json: not valid JSON"),
    (b"[1]", "adapter_config.json: expected object, got array"),
    (json.dumps({"peft_type": "LORA"}).encode(), "adapter_config.json: missing required field lora_alpha"),
    (json.dumps({"lora_alpha": "16"}).encode(), "adapter_config.json: lora_alpha: expected float, got str"),
    (json.dumps({"lora_alpha": True}).encode(), "adapter_config.json: lora_alpha: expected float, got bool"),
    (json.dumps({"lora_alpha": 16, "peft_type": "IA3"}).encode(), "adapter_config.json: peft_type: "),
])
def test_a_bad_adapter_config_is_refused_in_one_line(tmp_path, config, message):
    base, peft = tmp_path / "base", tmp_path / "peft"
    base.mkdir()
    peft.mkdir()
    (base / "config.json").write_text("{}")
    (peft / WEIGHTS[0]).write_bytes(b"weights")
    (peft / "adapter_config.json").write_bytes(config)
    with pytest.raises(PackagerError) as refused:
        convert(peft, base, tmp_path / "adapter.gguf")
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "adapter.gguf").exists()
