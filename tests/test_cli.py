"""The command line: explain prints every stored artifact; run checks itself against the reference."""
import re

import pytest

from attnc.cli import main


def test_explain_prints_generated_kernel(capsys):
    assert main(["explain", "specs/causal.attn", "--N", "64"]) == 0
    out = capsys.readouterr().out
    assert "@triton.jit" in out and "def attnc_fwd(" in out and "def visible(" in out
    for section in ("== parsed spec", "== IR (sha256", "== tile map 64x64", "== generated kernel"):
        assert section in out
    assert "mask  = k.i <= q.i" in out
    assert "density: 2080 of 4096 pairs visible" in out  # 64 * 65 / 2


def test_explain_tile_picture_for_causal(capsys):
    assert main(["explain", "specs/causal.attn", "--N=64", "--tiles", "16x16", "--section", "tiles"]) == 0
    out = capsys.readouterr().out
    picture = [line for line in out.splitlines() if re.fullmatch(r"[#+.]+", line)]
    assert picture == ["+...", "#+..", "##+.", "###+"]


def test_run_reports_a_small_error(capsys):
    assert main(["run", "specs/longformer.attn", "--N", "40", "--W", "4", "--G", "2", "--tiles", "16x16",
                 "--head-dim", "16"]) == 0
    out = capsys.readouterr().out
    err = float(re.search(r"reference\| = (\S+)", out).group(1))
    assert err < 1e-4


def test_bad_parameters_on_the_command_line(capsys):
    assert main(["explain", "specs/causal.attn", "--N", "sixty"]) == 1
    assert "needs a number" in capsys.readouterr().err
    assert main(["explain", "specs/causal.attn", "--M", "3"]) == 1
    assert "has no parameter 'M'" in capsys.readouterr().err
    assert main(["explain", "specs/causal.attn"]) == 1
    assert "needs a value for parameter N" in capsys.readouterr().err
    assert main(["explain", "specs/causal.attn", "--N", "64", "--tiles", "12x16"]) == 1
    assert "powers of two" in capsys.readouterr().err


def test_run_makes_up_runtime_tensors(capsys):
    # document ids and a bias table of the shapes the spec needs, then the usual self-check.
    for argv in (["specs/document_causal.attn", "--N", "40"], ["specs/swin_bias.attn", "--H", "7", "--W", "14"]):
        assert main(["run", *argv, "--tiles", "16x16", "--head-dim", "16"]) == 0
        out = capsys.readouterr().out
        assert "(random)" in out
        assert float(re.search(r"reference\| = (\S+)", out).group(1)) < 1e-4


def test_routing_specs_run_and_explain(capsys):
    assert main(["run", "specs/moba.attn", "--N", "40", "--B", "8"]) == 0
    assert main(["run", "specs/moba.attn", "--N", "40", "--B", "8", "--backend", "reference"]) == 0
    assert "(reference)" in capsys.readouterr().out
    assert main(["explain", "specs/biformer.attn", "--H", "14", "--W", "14"]) == 0
    out = capsys.readouterr().out
    assert "route = top(K) of regions(R, R) by mean(q) @ mean(k)" in out and "_chosen(SEL_row, k_grp, ROUTE_K)" in out


def test_explain_plots_the_tile_map(tmp_path, capsys):
    """--plot writes a PNG of the tile map (the chosen layout beside row-major)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "map.png"
    assert main(["explain", "specs/natten2d.attn", "--H", "16", "--W", "16", "--kernel", "3", "--dilation", "1",
                 "--section", "tiles", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert "tile map written to" in capsys.readouterr().err


def test_explain_plot_to_an_unwritable_path_is_an_attnc_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["explain", "specs/causal.attn", "--N", "64", "--section", "tiles",
                 "--plot", str(tmp_path / "no" / "such" / "dir" / "map.png")]) == 1
    assert "error: cannot write" in capsys.readouterr().err


def test_explain_shows_the_layout_candidates(capsys):
    assert main(["explain", "specs/natten2d.attn", "--H", "64", "--W", "64", "--kernel", "13",
                 "--dilation", "1", "--section", "layout"]) == 0
    out = capsys.readouterr().out
    assert "== layout" in out and "chosen: " in out
    chosen = re.search(r"chosen: (\S+),", out).group(1)
    assert re.search(rf"^{re.escape(chosen)} .*<- chosen$", out, re.M), out
    assert re.search(r"^row_major +row-major +row-major +\d+ +\d+ +\d+\.\d+% +\d+\.\d", out, re.M), out


def test_a_target_that_is_not_a_gpu_is_an_error(capsys):
    assert main(["tune", "specs/causal.attn", "--N", "64", "--target", "foo"]) == 1
    assert "--target 'foo': give a GPU target such as sm80 or sm90" in capsys.readouterr().err
