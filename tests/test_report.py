"""`mmtrain report`: curves and a summary table read back from runs' TensorBoard logs."""

from __future__ import annotations

import json

import pytest
import yaml

from mmtrain.train import monitor
from mmtrain.cli import main
from mmtrain.eval.report import ReportError, write_report


def write_run(run_dir, kind, n_ctx, segments):
    """A run directory as pretrain leaves it: config.yaml and one TensorBoard event file per process.

    segments: per process, a list of (step, {tag: value}).
    """
    run_dir.mkdir(parents=True)
    config = {"model": {"kind": kind, "d_model": 32, "n_layers": 2, "n_ctx": n_ctx}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for records in segments:
        m = monitor.Monitor(str(run_dir), enabled=True, total_steps=10, start_step=0, progress_bar=False)
        for step, values in records:
            m.scalars(step, values)
        m.close()


def train(step, loss, tokens_per_s, mfu, tokens_per_step=64):
    return (step, {monitor.TRAIN_LOSS: loss, monitor.TOKENS_SEEN: step * tokens_per_step,
                   monitor.TOKENS_PER_S: tokens_per_s, monitor.MFU: mfu})


def test_report_draws_curves_and_tabulates_the_final_numbers_of_each_run(tmp_path):
    mixer, transformer = tmp_path / "mixer-run", tmp_path / "transformer-run"
    write_run(mixer, "mixer", 32, [[train(1, 8.0, 100.0, 0.10), train(2, 7.0, 300.0, 0.30),
                                    train(3, 6.5, 200.0, 0.20), (3, {monitor.eval_tag(32): 6.9})]])
    # resumed from step 1: step 2 is logged again by the second process (that value wins)
    write_run(transformer, "transformer", 64, [
        [train(1, 8.1, 50.0, 0.05), train(2, 9.9, 50.0, 0.05), (2, {monitor.eval_tag(64): 9.0})],
        [train(2, 7.5, 150.0, 0.15), train(3, 7.2, 150.0, 0.15), train(4, 7.0, 150.0, 0.15),
         (4, {monitor.eval_tag(64): 7.4, monitor.eval_tag(32): 7.1})]])
    out = tmp_path / "report"
    summary = write_report([str(mixer), str(transformer)], str(out))

    first, second = summary["runs"]
    assert first["label"] == "mixer d32 L2 ctx32" and second["label"] == "transformer d32 L2 ctx64"
    assert (first["last_step"], first["tokens_seen"]) == (3, 192)
    assert (first["train_loss"], first["eval_loss"]) == (pytest.approx(6.5), pytest.approx(6.9))
    assert first["tokens_per_s"] == 200.0 and first["mfu"] == pytest.approx(0.20)      # medians
    assert second["eval_tag"] == "eval/loss_ctx64" and second["eval_loss"] == pytest.approx(7.4)
    assert (second["last_step"], second["train_loss"], second["tokens_seen"]) == (4, pytest.approx(7.0), 256)
    assert second["tokens_per_s"] == 150.0
    assert json.loads((out / "report.json").read_text()) == summary

    table = (out / "report.md").read_text()
    assert "| mixer-run | mixer d32 L2 ctx32 | 3 | 6.5000 | 6.9000 | 192 | 200 | 20.0% |" in table
    assert "| transformer-run | transformer d32 L2 ctx64 | 4 | 7.0000 | 7.4000 | 256 | 150 | 15.0% |" in table
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_refuses_a_directory_without_event_files(tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(ReportError, match="no TensorBoard event files"):
        write_report([str(empty)], str(tmp_path / "out"))
    assert main(["report", str(empty), str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "not-a-run: no TensorBoard event files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
