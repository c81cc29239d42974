"""The CLI as a user runs it: ``python -m fxquant demo|inspect`` and ``tools/inspect_graph.py``."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

def factory():
    torch.manual_seed(0)
    return Net(), (torch.randn(2, 64),)
'''


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def factory_file(tmp_path):
    p = tmp_path / "my_model.py"
    p.write_text(FACTORY)
    return p


@pytest.mark.parametrize("entry", [["-m", "fxquant", "inspect"], [str(ROOT / "tools" / "inspect_graph.py")]])
def test_inspect(entry, factory_file):
    r = run(*entry, f"{factory_file}:factory", "--spec", "int8wo", "--skip", "head", "--no-color")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "fc1" in out and "quantized" in out and "skip['head']" in out
    assert "TOTAL (2/3 quantized)" in out
    # before/after op counts and the rewritten graph with fxquant ops highlighted
    assert "aten.linear.default" in out and "fxquant.linear_int8wo.default" in out
    highlighted = [line for line in out.splitlines() if line.startswith(">> ")]
    assert len(highlighted) == 2 and all("int8wo via default" in line for line in highlighted)


def test_inspect_rules_and_json_spec(factory_file, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"default": "int4wo-32", "rules": {"fc2": "int8wo"}}')
    r = run("-m", "fxquant", "inspect", f"{factory_file}:factory", "--spec", str(spec), "--no-graph")
    assert r.returncode == 0, r.stderr
    assert "int4wo-32" in r.stdout and "rules['fc2']" in r.stdout and "rewritten graph" not in r.stdout


def test_inspect_bad_spec_is_one_clear_line(factory_file):
    r = run("-m", "fxquant", "inspect", f"{factory_file}:factory", "--spec", "int5wo")
    assert r.returncode == 2
    assert "unknown scheme 'int5wo'; valid schemes: int8wo" in r.stderr and "Traceback" not in r.stderr


def test_inspect_missing_factory(tmp_path):
    r = run("-m", "fxquant", "inspect", f"{tmp_path}/nope.py:factory", "--spec", "int8wo")
    assert r.returncode != 0 and "no such file" in r.stderr


def test_demo_tiny():
    r = run("-m", "fxquant", "demo", "--size", "tiny", "--seq-len", "8", "--reps", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("TOTAL (", "relative logits error", "eager latency, 1 token", "memory:", "MiB saved"):
        assert needle in out


def test_inspect_calibrated_method_shows_awq_in_the_graph(factory_file):
    """An @awq spec calibrates on the example; the graph marks where AWQ divides the input."""
    r = run("-m", "fxquant", "inspect", f"{factory_file}:factory", "--spec", "int8wo@awq", "--skip", "head",
            "--calibrate-on-example", "--no-color")
    assert r.returncode == 0, r.stderr
    assert "int8wo@awq" in r.stdout and "rel out err" in r.stdout
    marked = [line for line in r.stdout.splitlines() if line.startswith("~> ")]
    assert marked and all("AWQ" in line or "divided" in line for line in marked)
    r = run("-m", "fxquant", "inspect", f"{factory_file}:factory", "--spec", "int8wo@gptq", "--no-color")
    assert r.returncode != 0 and "need calibration data" in r.stderr and "--calibrate-on-example" in r.stderr
    assert "Traceback" not in r.stderr


def test_eval_ppl_checks_every_spec_and_count_before_running():
    """A typo in the last of many rows is an argparse error before the first row (rows take minutes)."""
    r = run(str(ROOT / "tools" / "eval_ppl.py"), "--specs", "float", "int4wo-64@foo")
    assert r.returncode == 2 and "--specs 'int4wo-64@foo'" in r.stderr and "unknown method 'foo'" in r.stderr
    assert "ppl" not in r.stdout
    r = run(str(ROOT / "tools" / "eval_ppl.py"), "--windows", "0")
    assert r.returncode == 2 and "--windows must be >= 1" in r.stderr
