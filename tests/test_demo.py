"""The README's main job: ``python -m diffkern demo`` learns the ring and writes its PNG."""

import pytest
import torch

from diffkern import demo

matplotlib = pytest.importorskip("matplotlib", reason="the demo's plot needs matplotlib")


def test_demo_learns_the_ring_and_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    scores = demo.run(str(out), seed=int(torch.randint(0, 2**31, (1,))))
    printed = capsys.readouterr().out
    assert "near a mode" in printed and str(out) in printed
    image = matplotlib.pyplot.imread(str(out))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    # Standard-normal points land near a mode about 5% of the time; a trained model, well over 85%.
    for name, score in scores.items():
        assert score["near_mode"] > 0.85, (name, score)
        assert score["modes_covered"] == demo.NUM_MODES, (name, score)


def test_quality_metric_separates_data_from_noise():
    generator = torch.Generator().manual_seed(0)
    assert demo.quality(demo.ring_of_gaussians(4000, generator))["near_mode"] > 0.99
    assert demo.quality(torch.randn(4000, 2, generator=generator))["near_mode"] < 0.15


def test_cli_rejects_unknown_command():
    from diffkern.__main__ import main
    with pytest.raises(SystemExit):
        main(["train"])
