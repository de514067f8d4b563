"""`cw-export run BUNDLE --grid PROMPTS --image-out grid.png` on an INT8 bundle: the comparison picture."""

from __future__ import annotations

import pytest

import numpy as np

from cw_export.cli import main
from cw_export.runtime.image import decode_png


@pytest.mark.slow  # torch and onnxruntime columns of an INT8 bundle: ~2 minutes
def test_grid_of_an_int8_bundle(low_parity_bundle, tmp_path, capsys):
    from cw_export.grid import make_grid

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n# a comment\na blue circle on the left\n", encoding="utf-8")
    out = tmp_path / "grid.png"
    assert main(["run", str(low_parity_bundle), "--grid", str(prompts), "--image-out", str(out), "--seed", "3"]) == 0
    captured = capsys.readouterr()
    import matplotlib.image

    picture = matplotlib.image.imread(out)  # the labelled grid is matplotlib's RGBA PNG
    assert picture.ndim == 3 and picture.shape[0] > 64 and picture.std() > 0.05

    result = make_grid(low_parity_bundle, ["a red square", "a blue circle on the left"], seed=3)
    assert result.columns[:3] == ["full fp32 (torch)", "clockwork fp32 (torch, clock 2)", "clockwork int8 (cpu)"]
    # the HTP column is there when the emulated NPU runs the graphs; otherwise the grid says why it is missing
    assert len(result.columns) == 4 or "qnn-htp" in captured.out
    assert all(len(row) == len(result.columns) for row in result.rows)
    # the INT8 CPU tile is exactly what `cw-export run --prompt P --seed 3+k` writes
    single = tmp_path / "one.png"
    assert main(["run", str(low_parity_bundle), "--prompt", "a blue circle on the left", "--seed", "4",
                 "--image-out", str(single)]) == 0
    assert np.array_equal(decode_png(single.read_bytes()), result.rows[1][2])
    assert not np.array_equal(result.rows[0][0], result.rows[0][1])  # clocking changes the image
