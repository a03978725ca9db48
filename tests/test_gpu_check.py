"""bench/gpu.sh --dry: the GPU check's every row, on the CPU with tiny shapes, so that the
script a GPU session runs blind cannot rot between GPU sessions."""
import pytest
import json
import os
import subprocess
import sys

from helpers import REPO

# the rows the GPU check promises (bench/README.md), written out here on purpose: a row
# dropped from the script must fail this test
ROWS = ["1a", "1b", "1c", "1d", "2a", "2b", "3a", "3b", "4a", "4b", "4c", "4d", "4e", "5", "6a", "6b", "6c",
        "7a", "7b", "7c"]

pytestmark = pytest.mark.slow  # every test here starts a real model, a wheel or a subprocess run


def test_dry_run_prints_every_row_marked_dry(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.pop("OUT", None)
    r = subprocess.run(["bash", "bench/gpu.sh", "--dry", "--out", str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    table = r.stdout[r.stdout.index("== minispin GPU check"):].splitlines()
    assert "DRY" in table[0]
    lines = {line.split()[0]: line for line in table[3:] if line[:1].strip()}
    assert list(lines) == ROWS, list(lines)
    for key, line in lines.items():
        assert line.rstrip().endswith(" dry"), line

    data = json.load(open(tmp_path / "gpu_check.json"))
    assert data["dry"] and set(data["rows"]) == set(ROWS)
    rows = data["rows"]
    for key in ROWS:
        assert rows[key]["status"] in ("ok", "skipped"), (key, rows[key])
    # the correctness rows mean something even on tiny CPU models: fp32 logits equal to
    # transformers', bf16 no worse than transformers' own bf16, greedy equal
    for key in ("1a", "1b"):
        f = rows[key]["figures"]
        assert f["fp32_rel"] <= 1e-4 and f["bf16_err_ours"] <= 1.5 * f["bf16_err_hf"], f
    for key in ("1c", "1d"):
        assert rows[key]["figures"]["fp32_equal"] == rows[key]["figures"]["new"], rows[key]
    assert rows["5"]["figures"]["rc"] == 0 and rows["5"]["figures"]["exported"]
    assert abs(rows["6c"]["figures"]["loss_minus_ln2"]) < 1e-4  # fp32 on CPU: ln 2 at step 0
    assert rows["6b"]["figures"]["graphs_call2"] == 0  # the second same-shape call compiles nothing
    for key in ("7a", "7b"):  # compile_train's rows compiled their blocks (dynamo; "eager" backend here)
        assert rows[key]["figures"]["graphs"] > 0, rows[key]
    assert rows["4e"]["figures"]["bf16"]["step_s"] > 0 and rows["4e"]["ratio"] > 0
    assert os.path.getsize(tmp_path / "gpu_check.log") > 0
