"""Smoke test of scripts/train_toy.py: a few steps of every phase, then the saved folder must
load through the engine's normal loaders (pipeline and CLIP scorer) and stay under 25 MB."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_toy.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_toy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_toy_runs_end_to_end_and_saves_a_loadable_folder(tmp_path, capsys):
    out = tmp_path / "toy"
    _load_script().main(["--out", str(out), "--minutes", "0.2", "--max-steps", "2", "--eval-count", "1",
                         "--eval-steps", "2", "--seed", "3", "--pool", "64"])
    printed = capsys.readouterr().out
    for phase in ("[vae]", "[transformer]", "[clip]", "[eval] t2i_eval_short_zh", "[eval] incontext_en"):
        assert phase in printed

    from omnigen2_batch.model import load_pipeline
    from omnigen2_batch.scoring import ClipScorer

    pipeline = load_pipeline(out)
    assert not pipeline.is_tiny and pipeline.transformer.config.hidden_size == 96
    assert pipeline.scheduler.config.dynamic_time_shift is False
    image = pipeline(["蓝色背景上的红色圆形"], height=64, width=64, num_inference_steps=2).images[0]
    assert image.size == (64, 64)
    scorer = ClipScorer(f"local-dir:{out / 'clip'}")
    assert not scorer.random_weights
    assert scorer.embed_texts(["a red circle on a blue background", "蓝色背景上的红色圆形"]).shape == (2, 64)

    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) <= 25 * 2**20
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "--seed 3" in card and "vae_psnr_db" in card and "t2i_eval_short_zh_all" in card
    assert json.loads((out / "model_index.json").read_text())["toy_world"] is True
