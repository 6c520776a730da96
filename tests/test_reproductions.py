"""docs/reproductions.md cannot go stale silently: every item of ``scripts/reproduce.py`` runs here shortened
(``--quick``, the same code as the document's full runs) and its qualitative claim is checked; the document's figures
and numbers exist, and the numbers it quotes are those of ``docs/figures/*.json``."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reproductions.md"
FIGURES = ROOT / "docs" / "figures"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(reproduce, out: Path, item: str, *extra: str) -> dict:
    """``python scripts/reproduce.py ITEM --quick --out OUT`` in this process (the imports are paid once)."""
    assert reproduce.main([item, "--quick", "--out", str(out), *extra]) == 0
    return json.loads((out / f"{item}.json").read_text())


def shipped(item: str) -> dict:
    return json.loads((FIGURES / f"{item}.json").read_text())


def test_counterexample(reproduce, tmp_path):
    data = run(reproduce, tmp_path, "counterexample")
    online = data["results"]["online"]
    # after 1000 steps Adam has left -1 for the positive side, on its way to +1 (the worst point); AMSGrad stays low
    assert online["adam"]["last_period_mean"] > 0.2 and online["amsgrad"]["last_period_mean"] < -0.6
    # at the default final_lr and gamma the bounds are still wide: AdaBound/AMSBound follow Adam/AMSGrad
    assert online["adabound"]["final_x"] == pytest.approx(online["adam"]["final_x"], abs=1e-3)
    assert online["amsbound"]["final_x"] == pytest.approx(online["amsgrad"]["final_x"], abs=1e-3)
    # with the paper's 1010x / -10x the bounds act: AdaBound swings between -1 and about 0, on the negative side
    scaled = data["results"]["online_scale10"]
    for name in ("adabound", "amsbound"):
        assert scaled[name]["last_period_min"] < -0.99 and scaled[name]["last_period_mean"] < -0.3
    assert (tmp_path / "counterexample.png").stat().st_size > 10_000
    assert set(data) == set(shipped("counterexample"))


def test_surfaces(reproduce, tmp_path):
    data = run(reproduce, tmp_path, "surfaces")
    for surface in ("beale", "rosenbrock", "saddle"):
        assert (tmp_path / f"{surface}.png").stat().st_size > 10_000
        common = data["surfaces"][surface]["common_lr"]
        assert len(common) == 12 and all(set(r) >= {"x", "y", "f", "diverged"} for r in common.values())
    beale = data["surfaces"]["beale"]
    assert beale["plain_loop_vs_train_max_diff"] < 1e-5  # the sweep's loop follows train()'s path
    assert beale["common_lr"]["momentum"]["diverged"] and not beale["common_lr"]["adam"]["diverged"]
    # on the saddle's ridge plain SGD has hardly moved off y = 0 while Adam has escaped
    saddle = data["surfaces"]["saddle"]["common_lr"]
    assert abs(saddle["sgd"]["y"]) < 0.01 < abs(saddle["adam"]["y"])
    # the full run adds AdaBound at final_lr 2e-3 on Rosenbrock
    assert set(data["surfaces"]["rosenbrock"]) | {"final_lr_2e-3"} == set(shipped("surfaces")["surfaces"]["rosenbrock"])


def test_sensitivity(reproduce, tmp_path):
    data = run(reproduce, tmp_path, "sensitivity")
    for problem, result in data["problems"].items():
        assert result["failed_trials"] == 0 and result["trials"] == 2 + 2 + 2 + 2 * 2 * 2
        names = [r["optimizer"] for r in result["optimizers"]]
        assert sorted(names) == ["adabound", "adam", "amsbound", "momentum"]
        assert all(r["width_decades"] >= 0 for r in result["optimizers"])
        assert (tmp_path / f"sensitivity_{problem}_robustness.csv").is_file()
    assert (tmp_path / "sensitivity.png").stat().st_size > 10_000
    assert set(data["problems"]["digits"]) == set(shipped("sensitivity")["problems"]["digits"])


def test_efflr(reproduce, tmp_path):
    data = run(reproduce, tmp_path, "efflr")
    for name in ("adam", "adabound"):
        records = data["optimizers"][name]["records"]
        assert records["start"]["step"] == 1 and records["end"]["step"] > records["middle"]["step"]
        assert (tmp_path / f"efflr_heatmap_{name}.png").is_file()
    # AdaBound's rates are clipped into [lower, upper] around final_lr: nothing above 1000 after the first steps
    assert data["optimizers"]["adabound"]["records"]["end"]["above_1000"] == 0
    assert (tmp_path / "efflr.png").stat().st_size > 10_000


def test_bias(reproduce, tmp_path):
    data = run(reproduce, tmp_path, "bias")
    worst = next(r for r in data["summary"] if r["beta2"] == 0.9999 and r["beta1"] == 0.0 and r["lr"] == 1e-2)
    # without the correction the first steps are up to 100x lr: the loss of the first epoch blows up
    assert worst["max_train_loss_first12_off"] > 3 * worst["max_train_loss_first12_on"]
    assert (tmp_path / "bias.png").stat().st_size > 10_000


def test_batchnorm(reproduce, tmp_path):
    data = run(reproduce, tmp_path, "batchnorm")
    # one epoch of SGD at lr 0.01 and 1: the BN MLP is ahead of the plain one at both (0.25 vs 0.11, 0.81 vs 0.45)
    for row in data["summary"]:
        assert row["acc_bn"] > row["acc_plain"] + 0.1, row
    assert (tmp_path / "batchnorm_lr.png").stat().st_size > 10_000


def test_gradnoise(reproduce, tmp_path):
    data = run(reproduce, tmp_path, "gradnoise")
    runs = {r["eta"]: r for r in data["runs"]}  # adam, zero init, lr 1e-3, one seed, eta 0 and 1
    # all-zero weights: without noise no hidden weight gets a gradient, the net stays a constant prediction
    assert runs[0.0]["val_acc"][-1] < 0.15
    # the noise broke the symmetry: the predictions are no longer one constant class (the JSON's losses are rounded)
    assert runs[1.0]["val_acc"] != runs[0.0]["val_acc"]
    assert (tmp_path / "gradnoise_deep_mlp.png").stat().st_size > 10_000


def test_deepobs(reproduce, tmp_path):
    """Two optimizers x four lrs x two seeds as populations, plus a one-at-a-time sample: every seed's run is read
    back from MLflow, and Adam at lr 2.51 diverges for every seed (marked, not averaged)."""
    data = run(reproduce, tmp_path, "deepobs", "--workdir", str(tmp_path / "work"))
    assert data["runs"] == 2 * 4 * 2 and data["one_at_a_time"]["runs"] == 2
    rows = {r["optimizer"]: r for r in data["optimizers"]}
    assert set(rows) == {"sgd", "adam"} and all(r["runs"] == 8 for r in rows.values())
    assert rows["adam"]["all_diverged_from_lr"] == 2.51 and rows["adam"]["diverged_runs"] == 2
    assert rows["adam"]["best_median"] < rows["sgd"]["best_median"] < 2.4  # one epoch: Adam learns faster
    assert (tmp_path / "deepobs_panels.png").stat().st_size > 10_000
    assert set(data) == set(shipped("deepobs"))


def test_configs_table_is_the_documents(tmp_path):
    """As a script (the entry point the document shows); the table it writes appears verbatim in the document."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "configs", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "configs.md").read_text() in DOC.read_text()
    data = json.loads((tmp_path / "configs.json").read_text())
    assert data["cifar10_resnet34"]["reported"][0] == "adabound 94.86% (95.03%)"
    assert data == shipped("configs")


def test_the_documents_figures_exist():
    text = DOC.read_text()
    linked = re.findall(r"\]\((figures/[^)]+)\)", text)
    assert linked, "the document links no figure"
    for path in linked:
        assert (DOC.parent / path).is_file(), path
    for gif in FIGURES.glob("*.gif"):
        assert gif.stat().st_size < 2_000_000, gif


def test_the_document_quotes_the_shipped_numbers():
    """A sample of each item's headline numbers, formatted as the document writes them. Rerunning the script rewrites
    the JSON (the trained networks' numbers can move in the 3rd digit between processes): update the page with it."""
    text = DOC.read_text()
    online = shipped("counterexample")["results"]["online"]
    quoted = [f"{online[n]['final_x']:.3f}" for n in ("adam", "amsgrad", "adabound", "amsbound")]
    surfaces = shipped("surfaces")["surfaces"]
    quoted += [f"{surfaces['rosenbrock']['common_lr']['adam']['f']:.2g}"]
    sens = shipped("sensitivity")["problems"]
    quoted += [f"{r['width_decades']:.2f}" for p in sens.values() for r in p["optimizers"]]
    eff = shipped("efflr")["optimizers"]
    quoted += [f"{eff[n]['records']['end'][k]:.4f}" for n in eff for k in ("below_0.01", "above_1000")]
    worst = next(r for r in shipped("bias")["summary"] if (r["beta1"], r["beta2"], r["lr"]) == (0.0, 0.9999, 0.03))
    quoted += [f"{worst['max_train_loss_first24_off']:.4g}"]
    missing = [q for q in quoted if q not in text]
    assert not missing, f"docs/reproductions.md does not quote {missing}: rerun scripts/reproduce.py and update it"
