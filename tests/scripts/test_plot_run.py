"""scripts/plot_run.py: event files to per-iteration scalars, CSV and curves."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import plot_run  # noqa: E402


def write_lightning_like_events(run_dir: Path) -> None:
    """Events the way the module logs them: train metrics at step k-1 with iteration k, plus an
    evaluation before the first RL update logged at the same step as the last SFT iteration's
    metrics, but with its own iteration value (the SFT -> RL switch)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for it in (1, 2):  # SFT
        writer.add_scalar("iteration", it, it - 1)
        writer.add_scalar("train/sft_loss", 3.0 - it, it - 1)
        writer.add_scalar("train/lr", 3e-3, it - 1)
    # phase switch: evaluation at iteration 2, logged at step 2 (= optimizer steps so far)
    writer.add_scalar("val/synthetic/accuracy", 0.25, 2)
    writer.add_scalar("val/synthetic/pass@4", 0.5, 2)
    writer.add_scalar("val/synthetic/response_length", 17.0, 2)
    writer.add_scalar("iteration", 2, 2)
    writer.flush()
    for it in (3, 4):  # RL: the first update's metrics are flushed at step 2 as well
        writer.add_scalar("iteration", it, it - 1)
        writer.add_scalar("reward", 0.1 * it, it - 1)
        writer.add_scalar("entropy", 1.0 / it, it - 1)
        writer.add_scalar("rl/gate_frac_high", 0.2, it - 1)
        writer.add_scalar("rl/clip_frac_high", 0.01 * it, it - 1)
        writer.add_scalar("train/rl_loss", 0.5, it - 1)
        writer.add_scalar("train/lr", 3e-4, it - 1)
    writer.add_scalar("val/synthetic/accuracy", 0.4, 4)
    writer.add_scalar("iteration", 4, 4)
    writer.close()


def test_scalars_land_on_their_iteration(tmp_path):
    write_lightning_like_events(tmp_path / "lightning_logs" / "version_0")
    scalars = plot_run.load_scalars(tmp_path)  # finds the event file under the run folder
    assert scalars["train/sft_loss"] == {1: 2.0, 2: 1.0}
    assert scalars["reward"] == pytest.approx({3: 0.3, 4: 0.4})
    # the switch-time evaluation shares step 2 with RL iteration 3 but belongs to iteration 2
    assert scalars["val/synthetic/accuracy"] == {2: 0.25, 4: pytest.approx(0.4)}
    assert scalars["train/lr"] == pytest.approx({1: 3e-3, 2: 3e-3, 3: 3e-4, 4: 3e-4})
    assert "iteration" not in scalars
    assert plot_run.rl_start_iteration(scalars) == 2


def test_csv_round_trip(tmp_path):
    write_lightning_like_events(tmp_path / "run")
    scalars = plot_run.load_scalars(tmp_path / "run")
    plot_run.write_csv(scalars, tmp_path / "out" / "scalars.csv")
    back = plot_run.read_csv(tmp_path / "out" / "scalars.csv")
    assert back.keys() == scalars.keys()
    for tag in scalars:
        assert back[tag] == pytest.approx(scalars[tag]), tag


def test_panels_pick_rates_for_the_accuracy_panel(tmp_path):
    write_lightning_like_events(tmp_path)
    scalars = plot_run.load_scalars(tmp_path)
    tags = plot_run.panel_tags(scalars, plot_run.PANELS["held-out accuracy"])
    assert tags == ["val/synthetic/accuracy", "val/synthetic/pass@4"]  # not response_length


def test_main_writes_csv_and_png(tmp_path):
    write_lightning_like_events(tmp_path / "lightning_logs" / "version_0")
    png = plot_run.main([str(tmp_path)])
    assert png == tmp_path / "lightning_logs" / "version_0" / "plots" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (png.parent / "scalars.csv").is_file()


def test_missing_event_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
        plot_run.main([str(tmp_path)])
