"""`attnc tune` without a GPU: the static choice passes the report's checks, is written to the
cache, read back for the launch config and shown by `attnc explain`."""
import json

import attnc
from attnc import tune
from attnc.cli import main
from attnc.codegen.target import tuned


def test_static_tuning_is_kept_and_shown(tmp_path, monkeypatch, capsys):
    from attnc import settings

    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(settings, "_settings", None)  # re-read: the session's settings are cached
    # Two candidates per kernel keep this quick: the default and a deeper/shallower pipeline.
    monkeypatch.setattr(tune, "CANDIDATES", {"fwd": [(4, 3), (4, 2)], "dq": [(8, 3), (4, 2)], "dkdv": [(8, 2), (4, 2)]})
    assert main(["tune", "specs/causal.attn", "--N", "64", "--target", "sm90", "--head-dim", "64"]) == 0
    out = capsys.readouterr().out
    path = next((tmp_path / "tune").glob("causal_*-t64x64-sm90-bf16-d64.json"))
    data = json.loads(path.read_text())
    assert str(path) in out and set(data["kernels"]) == {"fwd", "dq", "dkdv"}
    for kernel, choice in data["kernels"].items():
        assert choice["how"] == "static" and choice["spill_bytes"] == 0
        assert (choice["num_warps"], choice["num_stages"]) in tune.CANDIDATES[kernel]
    fn = attnc.compile("specs/causal.attn", N=64)
    got = tuned(tmp_path, fn.compiled.kernel_path.stem, (64, 64), 90, "bf16", 64)
    assert got == {k: (v["num_warps"], v["num_stages"]) for k, v in data["kernels"].items()}
    assert tuned(tmp_path, fn.compiled.kernel_path.stem, (64, 64), 80, "bf16", 64) is None
    assert tuned(tmp_path, fn.compiled.kernel_path.stem, (128, 64), 90, "bf16", 64) is None  # other tiles
    assert main(["explain", "specs/causal.attn", "--N", "64", "--section", "kernel"]) == 0
    assert "tuned for sm_90 bf16 D=64 tiles 64x64" in capsys.readouterr().out
