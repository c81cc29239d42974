"""tools/bench_e2e.py runs end to end on a 2-layer random Llama: the bf16 reference, an fxquant
row and a peer row, 4 new tokens, eager.  Checks the results' shape, not speed (no timed assertion)."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[models]'")
pytest.importorskip("tabulate")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import bench_e2e  # noqa: E402


def test_bench_e2e_tiny_llama(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    argv = ["--models", "tiny-llama", "--modes", "eager", "--new-tokens", "4", "--prompt-len", "8",
            "--prefill-len", "16", "--reps", "1", "--threads", "1", "--rows", "int8wo", "quanto-qint8", "--json", str(out)]
    assert bench_e2e.main(argv) == 0
    text = capsys.readouterr().out
    assert "tiny-llama / eager" in text and "targets" in text
    assert "command: python tools/bench_e2e.py --models tiny-llama" in text
    rows = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"bf16", "int8wo", "quanto-qint8"}
    mine, peer, bf16 = rows["int8wo"], rows["quanto-qint8"], rows["bf16"]
    assert mine["error"] is None, mine["error"]
    assert peer["error"] is None or "not importable" in peer["error"], peer["error"]
    assert len(mine["decode_s"]) == len(mine["prefill_s"]) == len(mine["ref_decode_s"]) == 1
    assert min(mine["decode_s"] + mine["prefill_s"]) > 0
    assert len(bf16["decode_s"]) == (1 if peer["error"] else 2)  # the reference's samples, paired with each row
    assert mine["weight_bytes"] < 0.7 * bf16["weight_bytes"]
