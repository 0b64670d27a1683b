"""scripts/compare_methods.py: aggregation over seeds, the report, and a --quick end-to-end run."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import compare_methods as cm  # noqa: E402


def result(method, seed, accuracy, entropy, wall, reward_curve, ok=True):
    return cm.RunResult(
        method=method,
        seed=seed,
        run_dir=f"/runs/{method}/{seed}",
        wall_time=wall,
        ok=ok,
        final={"accuracy": accuracy, "pass@1": accuracy / 2, "pass@4": accuracy, "final_entropy": entropy},
        curves={"reward": reward_curve, "accuracy": {0: 0.1, 10: accuracy}},
    )


RESULTS = [
    result("grpo", 0, 0.40, 0.5, 100.0, {1: 0.1, 2: 0.2, 3: 0.3}),
    result("grpo", 1, 0.50, 0.7, 110.0, {1: 0.3, 2: 0.4, 3: 0.5}),
    result("grpo", 2, 0.60, 0.9, 120.0, {1: 0.2, 2: 0.3}),  # ended early: fewer points
    result("egspo", 0, 0.70, 1.0, 90.0, {1: 0.5, 2: 0.6, 3: 0.7}),
    result("egspo", 1, math.nan, math.nan, 5.0, {}, ok=False),  # failed run: left out
]


# 95% half-width over 3 seeds: t(0.975, 2) * s / sqrt(3), with t = 4.303
HALF = 4.303 / math.sqrt(3)


def test_mean_interval_uses_students_t_and_skips_nan():
    mean, half = cm.mean_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and half == pytest.approx(1.0 * HALF)
    assert cm.mean_interval([4.0, math.nan]) == (4.0, 0.0)
    assert all(math.isnan(x) for x in cm.mean_interval([]))


def test_aggregate_over_seeds():
    table = cm.aggregate(RESULTS)
    assert list(table) == ["grpo", "egspo"]
    assert table["grpo"]["accuracy"] == pytest.approx((0.5, 0.1 * HALF))
    assert table["grpo"]["final_entropy"] == pytest.approx((0.7, 0.2 * HALF))
    assert table["grpo"]["wall_time"] == pytest.approx((110.0, 10.0 * HALF))
    assert table["grpo"]["seeds"][0] == 3
    assert table["egspo"]["accuracy"] == (0.7, 0.0) and table["egspo"]["seeds"][0] == 1


def test_band_keeps_the_iterations_every_seed_has():
    xs, means, lo, hi = cm.band([r.curves["reward"] for r in RESULTS[:3]])
    assert xs == [1, 2]
    assert means == pytest.approx([0.2, 0.3])
    assert lo == pytest.approx([0.1, 0.2]) and hi == pytest.approx([0.3, 0.4])
    assert cm.band([]) == ([], [], [], [])


def test_smooth_is_a_trailing_moving_average():
    assert cm.smooth({1: 1.0, 2: 3.0, 3: 5.0, 4: 7.0}, 2) == {1: 1.0, 2: 2.0, 3: 4.0, 4: 6.0}


def test_an_arm_is_an_overlay_plus_overrides():
    arm = cm.parse_arm("lr_half=egspo:--model.update.rl_learning_rate=1e-4:--data.seed=3")
    assert arm == cm.Arm(
        "lr_half", "lr_half", "egspo", ("--model.update.rl_learning_rate=1e-4", "--data.seed=3")
    )
    assert cm.parse_arm("plain=").overlay is None


def test_table_has_a_row_per_method_and_the_warm_up():
    labels = {name: arm.label for name, arm in cm.METHODS.items()}
    text = cm.format_table(
        cm.aggregate(RESULTS), labels, sft={"accuracy": 0.3, "pass@1": 0.2, "pass@4": 0.45}
    )
    lines = text.splitlines()
    assert lines[0].split(" | ")[1:4] == ["held-out accuracy", "pass@1", "pass@4"]
    assert lines[0].split(" | ")[-4:-1] == [
        "final entropy (nats)",
        "final all-equal share",
        "wall time / run (s)",
    ]
    assert lines[2].startswith("| SFT warm-up | 0.300 | 0.200 | 0.450 |")
    assert lines[3].startswith(
        "| GRPO | 0.500 ± 0.248 | 0.250 ± 0.124 | 0.500 ± 0.248 | 0.700 ± 0.497 | - | 110 ± 25 | 3 |"
    )
    assert lines[4].startswith("| EGSPO | 0.700 ± 0.000 |")


def test_sign_test_is_the_exact_two_sided_binomial():
    assert cm.sign_test([1.0] * 5) == pytest.approx(2 / 32)
    assert cm.sign_test([1.0, 1.0, 1.0, -1.0, 0.0]) == pytest.approx(2 * 5 / 16)  # tie dropped: 3 of 4
    assert cm.sign_test([0.0, 0.0]) == 1.0
    # 15 of 20 positive: P(X >= 15) = 21700 / 2^20
    assert cm.sign_test([1.0] * 15 + [-1.0] * 5) == pytest.approx(2 * 21700 / 2**20)


def test_paired_differences_are_seed_by_seed():
    runs = [
        result("a", 0, 0.50, 0.1, 1.0, {}),
        result("a", 1, 0.70, 0.1, 1.0, {}),
        result("a", 2, 0.60, 0.1, 1.0, {}),
        result("a", 3, 0.90, 0.1, 1.0, {}, ok=False),  # failed: seed 3 left out of the pair
        result("b", 0, 0.40, 0.2, 1.0, {}),
        result("b", 1, 0.70, 0.2, 1.0, {}),
        result("b", 2, 0.40, 0.2, 1.0, {}),
        result("b", 3, 0.10, 0.2, 1.0, {}),
    ]
    test = cm.paired(runs, "a", "b")["accuracy"]
    assert test["seeds"] == [0, 1, 2]
    assert test["differences"] == pytest.approx([0.1, 0.0, 0.2])
    mean, half = cm.mean_interval([0.1, 0.0, 0.2])
    assert (test["mean"], test["half_width"]) == pytest.approx((mean, half))
    assert (test["wins"], test["losses"], test["ties"]) == (2, 0, 1)
    assert test["sign_test_p"] == pytest.approx(0.5)
    table = cm.format_paired({"a:b": cm.paired(runs, "a", "b")}, {"a": "A", "b": "B"})
    assert "| A - B | accuracy | 3 | +0.100 [" in table and "| 2 / 0 / 1 | 0.500 |" in table


def test_paired_arms_must_be_known_and_run(tmp_path, capsys):
    assert cm.parse_pair("egspo_mu:chord_phi") == ("egspo_mu", "chord_phi")
    with pytest.raises(SystemExit) as error:
        cm.parse_args(["--paired", "egspo:nope"])
    assert error.value.code == 2 and "--paired" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        cm.main(["--paired", "egspo:grpo", "--methods", "egspo", "--work", str(tmp_path)])
    assert error.value.code == 2 and "--paired" in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()  # refused before any training


def _finished_run(run_dir: Path, accuracy: float, all_equal: list[float]) -> None:
    """What a finished RL run leaves: summary.json, an event file, and the wall-time marker."""
    from torch.utils.tensorboard import SummaryWriter

    logs = run_dir / "lightning_logs" / "version_0"
    writer = SummaryWriter(str(logs))
    for it, share in enumerate(all_equal, start=1):
        writer.add_scalar("iteration", it, it - 1)
        writer.add_scalar("entropy", 0.5, it - 1)
        writer.add_scalar("reward", 0.3, it - 1)
        writer.add_scalar("rollout/all_equal_groups", share, it - 1)
    writer.close()
    (logs / "summary.json").write_text(json.dumps({"rl": {"metrics": {"synthetic": {"accuracy": accuracy}}}}))
    (run_dir / "wall_time.json").write_text(json.dumps({"wall_time_s": 12.0}))


def test_report_only_writes_what_finished_and_trains_nothing(tmp_path, capsys):
    work, out = tmp_path / "w", tmp_path / "o"
    (work / "sft" / "policy").mkdir(parents=True)
    (work / "sft" / "policy" / "config.json").write_text("{}")
    (work / "sft" / "metrics.json").write_text(json.dumps({"accuracy": 0.4}))
    _finished_run(work / "grpo" / "seed0", 0.5, [0.2] * 6 + [0.5] * 5)
    _finished_run(work / "gspo" / "seed0", 0.6, [0.1] * 11)
    _finished_run(work / "gspo" / "seed1", 0.7, [0.1] * 11)
    args = [
        "--report-only",
        "--paired",
        "gspo:grpo",
        "--seeds",
        "0",
        "1",
        "--work",
        str(work),
        "--out",
        str(out),
    ]
    report = cm.main(args)
    printed = capsys.readouterr().out
    assert "not run yet: grpo seed 1" in printed and not (work / "grpo" / "seed1").exists()
    text = report.read_text()
    assert "| GRPO | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 12 ± 0 | 1 |" in text
    assert "| GSPO | 0.650 ± " in text
    assert "| GSPO - GRPO | accuracy | 1 | +0.100 [+0.100, +0.100] | 1 / 0 / 0 | 1.000 |" in text
    with pytest.raises(SystemExit) as error:
        cm.main(["--report-only", "--work", str(tmp_path / "empty"), "--out", str(out)])
    assert error.value.code == 2 and "--report-only" in capsys.readouterr().err


def test_config_budget_applies_overrides():
    budget = cm.config_budget(
        ROOT / "configs" / "demo.yaml", ["--model.rollout.num_generations=4", "--data.seed=3"]
    )
    assert budget["num_generations"] == 4
    assert isinstance(budget["rl_iterations"], int) and isinstance(budget["prompts_per_step"], int)


def test_rl_command_starts_from_the_warm_up_with_the_method_overlay(tmp_path):
    command = cm.rl_command(
        ROOT / "configs" / "demo.yaml", cm.METHODS["espo"], 2, tmp_path / "policy", tmp_path / "run", []
    )
    joined = " ".join(command)
    assert f"--config {ROOT / 'configs' / 'method' / 'espo.yaml'}" in joined
    for flag in (
        "--model.sft_iterations=0",
        f"--model.policy.name_or_path={tmp_path / 'policy'}",
        "--model.policy.config=null",
        "--seed_everything=2",
        "--data.seed=2",
    ):
        assert flag in command


@pytest.mark.slow
def test_quick_comparison_end_to_end(tmp_path):
    report = cm.main(
        [
            "--quick",
            "--paired",
            "egspo:top_entropy",
            "--seeds",
            "0",
            "1",
            "--work",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    text = report.read_text()
    assert "| EGSPO |" in text and "| SFT warm-up |" in text and "Failed runs" not in text
    assert "| EGSPO - top-entropy (80/20) | accuracy | 2 |" in text
    data = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in data["runs"]] == [
        ("egspo", 0),
        ("top_entropy", 0),
        ("egspo", 1),
        ("top_entropy", 1),
    ]
    assert all(r["ok"] for r in data["runs"])
    assert data["paired"]["egspo:top_entropy"]["accuracy"]["seeds"] == [0, 1]
    run = data["runs"][0]
    assert sorted(map(int, run["curves"]["reward"])) == [1, 2]
    assert sorted(map(int, run["curves"]["accuracy"])) == [2]  # evaluated at the end of the RL phase
    assert {"accuracy", "pass@1", "pass@4", "maj@4", "final_entropy", "final_all_equal"} <= set(run["final"])
    assert 0.0 <= run["final"]["final_all_equal"] <= 1.0
    assert set(run["curves"]) == set(cm.CURVES)
    assert (tmp_path / "o" / "compare_curves.png").read_bytes()[:4] == b"\x89PNG"


def _earlier_report(path: Path, settings: dict, sft: dict, runs: list) -> Path:
    path.write_text(json.dumps({"settings": settings, "sft": sft, "paired": {}, "runs": runs}))
    return path


def test_earlier_report_stands_in_for_missing_run_folders(tmp_path, capsys):
    work, out = tmp_path / "w", tmp_path / "o"
    (work / "sft" / "policy").mkdir(parents=True)
    (work / "sft" / "policy" / "config.json").write_text("{}")
    (work / "sft" / "metrics.json").write_text(json.dumps({"accuracy": 0.4}))
    _finished_run(work / "grpo" / "seed1", 0.5, [0.2] * 11)  # a folder here wins over the report
    _finished_run(work / "gspo" / "seed1", 0.7, [0.1] * 11)
    common = ["--paired", "gspo:grpo", "--seeds", "0", "1", "--work", str(work), "--out", str(out)]
    alone = cm.main(["--report-only", *common]).read_text()
    assert "| GSPO - GRPO | accuracy | 1 | +0.200 " in alone and "earlier report" not in alone
    settings = json.loads((out / "compare.json").read_text())["settings"]
    old = [
        asdict_run(result("gspo", 0, 0.9, 0.5, 10.0, {1: 0.3})),
        asdict_run(result("grpo", 0, 0.6, 0.5, 10.0, {1: 0.3})),
        asdict_run(result("grpo", 1, 0.1, 0.5, 10.0, {1: 0.3})),  # shadowed by the folder
    ]
    earlier = _earlier_report(tmp_path / "old.json", settings, {"accuracy": 0.4}, old)
    report = cm.main(["--report-only", "--earlier", str(earlier), *common])
    text = report.read_text()
    assert "| GSPO - GRPO | accuracy | 2 | +0.250 " in text  # seed 0: 0.9 - 0.6, seed 1: 0.7 - 0.5
    assert "2 of the 4 runs are taken from an earlier report" in text and "GSPO seeds 0; GRPO seeds 0" in text
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs if r["earlier"]) == [("grpo", 0), ("gspo", 0)]
    capsys.readouterr()
    # another warm-up or another protocol: refused in one line, nothing mixed
    for bad_settings, bad_sft, word in (
        (settings, {"accuracy": 0.41}, "warm-up"),
        ({**settings, "rl_iterations": 7}, {"accuracy": 0.4}, "rl_iterations"),
    ):
        bad = _earlier_report(tmp_path / "bad.json", bad_settings, bad_sft, old)
        with pytest.raises(SystemExit) as error:
            cm.main(["--report-only", "--earlier", str(bad), *common])
        assert str(error.value).startswith(f"--earlier {bad}") and word in str(error.value)


def asdict_run(run: cm.RunResult) -> dict:
    """A run as compare.json stores it (JSON turns the curves' iteration keys into strings)."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(run)))
