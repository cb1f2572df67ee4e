"""The CLINC150 experiment trains through the one loop (metafunc.train.fit), on the real CLINC150 files with a tiny
random MiniLM standing in for the pretrained one (loading it and embedding 22,500 utterances takes minutes)."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from metafunc.hf import TransformerEncoder  # noqa: E402
from metafunc.text import experiment  # noqa: E402


def _toy_tokenizer(texts, *, max_length, **options):  # one id per word: its length (< 50)
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    for i, text in enumerate(texts):
        words = [min(len(w), 49) for w in text.split()][:max_length]
        ids[i, :len(words)] = torch.tensor(words, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


@pytest.mark.data
def test_clinc_experiment_trains_through_fit_and_writes_its_results(tmp_path, data_root):
    toy = TransformerEncoder(transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)))
    calls = []
    real_fit = experiment.fit

    def spy(step, source, state, **kwargs):
        calls.append(kwargs)
        return real_fit(step, source, state, **kwargs)

    with mock.patch.object(experiment, "load_minilm", lambda: (_toy_tokenizer, toy)), \
            mock.patch.object(experiment, "fit", spy):
        summary = experiment.main(["--algorithm", "proto_maml", "--iterations", "3", "--episodes", "4",
                                   "--hidden", "8", "--out-features", "4", "--data-root", str(data_root / "clinc150"),
                                   "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert [c["meta_batch"] for c in calls] == [4]              # one fit call, the experiment's meta-batch
    run = tmp_path / "out" / "proto_maml-frozen-5w1s"
    saved = json.loads((run / "results.json").read_text())
    assert saved["test"]["episodes"] == 4 and 0.0 <= saved["test"]["mean"] <= 1.0
    assert summary["final_train_accuracy"] is not None and (run / "learning_curve.png").stat().st_size > 0
    assert (run / "checkpoint.pt").exists()
