"""The peak FLOP/s that MFU divides by: the data-sheet table by device name (a fake name function,
no GPU needed), the measured fallback, the config override, and the run's banner naming the source."""

import re

import pytest
import torch

from conftest import TINY, pretrain_in_process, read_metrics
from mmtrain.train import engine
from mmtrain.train.engine import DEVICE_PEAKS, PeakFlops, peak_flops, table_peak

T = 1e12
CUDA = torch.device("cuda")

# device name as torch.cuda.get_device_name() reports it -> (table entry, dense TFLOP/s per dtype)
H100_SXM = ("NVIDIA H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tf32": 494.7})
H100_PCIE = ("NVIDIA H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2, "tf32": 378.0})
H200 = ("NVIDIA H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tf32": 494.7})
A100 = ("NVIDIA A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0})
L4 = ("NVIDIA L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3, "tf32": 60.0})
KNOWN = {
    "NVIDIA H100 80GB HBM3": H100_SXM,
    "NVIDIA H100": H100_SXM,
    "NVIDIA H100 PCIe": H100_PCIE,
    "NVIDIA H200": H200,
    "NVIDIA A100-SXM4-80GB": A100,
    "NVIDIA A100-SXM4-40GB": A100,
    "NVIDIA A100-PCIE-40GB": A100,
    "NVIDIA A100 80GB PCIe": A100,
    "NVIDIA L4": L4,
}
# not in the table: other parts, and the NVL variants whose clocks differ from the SXM ones
UNKNOWN = ["NVIDIA L40S", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "Tesla V100-SXM2-16GB",
           "NVIDIA GeForce RTX 4090", "NVIDIA A10", ""]


@pytest.fixture()
def fake_gpu(monkeypatch):
    """Pretend a CUDA device of a given name is present; any matmul measurement is recorded and
    returns 1.25e14 FLOP/s (or what ``rates`` says for its dtype)."""
    state = {"name": "", "measured": [], "rates": {}}

    def fake_rate(device, dtype, max_size, budget_s):
        state["measured"].append((device.type, dtype))
        return state["rates"].get(dtype, 1.25e14)

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: state["name"])
    monkeypatch.setattr(engine, "_matmul_rate", fake_rate)
    monkeypatch.setattr(engine, "tf32_matmuls_enabled", lambda: False)
    return state


@pytest.mark.parametrize("name", list(KNOWN))
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_a_known_device_gets_its_dense_data_sheet_peak_without_measuring(fake_gpu, name, precision):
    fake_gpu["name"] = name
    entry, figures = KNOWN[name]
    peak = peak_flops(CUDA, precision)
    assert peak.value == pytest.approx(figures[precision] * T, rel=1e-12)
    assert peak.source.startswith(f"table: {entry} {precision} dense (")
    assert "data sheet" in peak.source
    assert fake_gpu["measured"] == []  # the table answered; nothing was timed


@pytest.mark.parametrize("name", list(KNOWN))
def test_fp32_uses_the_tf32_figure_only_when_torch_allows_tf32_matmuls(fake_gpu, monkeypatch, name):
    fake_gpu["name"] = name
    entry, figures = KNOWN[name]
    assert peak_flops(CUDA, "fp32").value == pytest.approx(figures["fp32"] * T)
    monkeypatch.setattr(engine, "tf32_matmuls_enabled", lambda: True)
    peak = peak_flops(CUDA, "fp32")
    assert peak.value == pytest.approx(figures["tf32"] * T) and peak.source.startswith(f"table: {entry} tf32 dense")
    assert peak_flops(CUDA, "bf16").value == pytest.approx(figures["bf16"] * T)  # TF32 changes only fp32


def test_tf32_switch_follows_torch():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert engine.tf32_matmuls_enabled() is False
        torch.set_float32_matmul_precision("high")
        assert engine.tf32_matmuls_enabled() is True
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert engine.tf32_matmuls_enabled() is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision(previous)


def test_the_table_holds_dense_figures_not_the_sparsity_ones():
    by_name = {p.name: p for p in DEVICE_PEAKS}
    assert set(by_name) == {"NVIDIA H100 SXM", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100", "NVIDIA L4"}
    # the data sheets' "with sparsity" rates are 2x these: 1,979 / 1,513 / 624 / 242 TFLOPS bf16
    assert by_name["NVIDIA H100 SXM"].bf16 < 1000 * T and by_name["NVIDIA H100 PCIe"].bf16 < 800 * T
    assert by_name["NVIDIA A100"].bf16 < 400 * T and by_name["NVIDIA L4"].bf16 < 130 * T
    for p in DEVICE_PEAKS:
        assert p.fp16 == p.bf16 and p.fp32 < p.tf32 < p.bf16
        assert p.tf32 == pytest.approx(p.bf16 / 2, rel=0.01)   # TF32 tensor cores: half the bf16 rate


def test_h100_pcie_is_matched_before_the_generic_h100():
    order = [p.name for p in DEVICE_PEAKS]
    assert order.index("NVIDIA H100 PCIe") < order.index("NVIDIA H100 SXM")
    assert table_peak("NVIDIA H100 PCIe", "bf16").source.startswith("table: NVIDIA H100 PCIe ")
    assert table_peak("nvidia h100 pcie", "bf16").value == pytest.approx(756.5 * T)  # case does not matter


@pytest.mark.parametrize("name", UNKNOWN)
def test_an_unknown_device_falls_back_to_a_measured_matmul_and_says_so(fake_gpu, name):
    fake_gpu["name"] = name
    assert table_peak(name, "bf16") is None
    peak = peak_flops(CUDA, "bf16")
    assert peak == PeakFlops(1.25e14, f"measured: bf16 matmul on cuda {name}".strip())
    assert fake_gpu["measured"] == [("cuda", torch.bfloat16)]


def test_an_unknown_precision_is_not_looked_up():
    assert table_peak("NVIDIA H100 80GB HBM3", "int8") is None


def test_engine_peak_flops_in_the_config_wins_over_table_and_measurement(fake_gpu):
    fake_gpu["name"] = "NVIDIA H100 80GB HBM3"
    for device in (CUDA, torch.device("cpu")):
        peak = peak_flops(device, "bf16", configured=4.2e14)
        assert peak == PeakFlops(4.2e14, "config: engine.peak_flops")
    assert fake_gpu["measured"] == []
    assert peak_flops(CUDA, "bf16", configured=0.0).source.startswith("table: NVIDIA H100 SXM bf16")


def test_a_cpu_is_measured_with_the_dtype_that_won_named(fake_gpu):
    cpu = torch.device("cpu")
    fake_gpu["rates"] = {torch.bfloat16: 4e11, torch.float32: 1.7e11}     # native bf16 (AVX512-BF16 / AMX)
    assert peak_flops(cpu, "bf16") == PeakFlops(4e11, "measured: bf16 matmul on cpu")
    fake_gpu["rates"] = {torch.bfloat16: 2e9, torch.float32: 1.7e11}      # emulated bf16: fp32 is the peak
    assert peak_flops(cpu, "bf16") == PeakFlops(1.7e11, "measured: fp32 matmul on cpu")
    fake_gpu["measured"].clear()
    assert peak_flops(cpu, "fp32") == PeakFlops(1.7e11, "measured: fp32 matmul on cpu")
    assert fake_gpu["measured"] == [("cpu", torch.float32)]   # fp32 alone; no table lookup on a CPU


def test_a_real_cpu_measurement(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = peak_flops(torch.device("cpu"), "fp32", max_size=256, budget_s=0.05)
    finally:
        torch.set_num_threads(threads)
    assert peak.source == "measured: fp32 matmul on cpu"
    assert 1e8 < peak.value < 1e13 and float(peak) == peak.value
    assert re.fullmatch(r"[\d,.]+ [GT]FLOP/s \(measured: fp32 matmul on cpu\)", peak.describe())


def run_args(shards, run_dir, *extra):
    return ["--config", TINY, f"data.shard_dir={shards}", f"logging.run_dir={run_dir}", "train.steps=2",
            "train.eval_every=0", "checkpoint.every=0", "engine.device=cpu", *extra]


def banner(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("[mmtrain] run dir")]
    assert len(lines) == 1, stdout
    return lines[0]


def logged_peak(trainer) -> float:
    """The peak implied by the logged MFU: tokens/s x flops_per_token / MFU (world of one)."""
    records = [r for r in read_metrics(trainer.run_dir) if "mfu" in r]
    assert len(records) == 2
    peaks = {r["tokens_per_s"] * trainer.info.flops_per_token / r["mfu"] for r in records}
    return sum(peaks) / len(peaks)


def test_a_run_names_its_configured_peak_and_mfu_divides_by_it(demo_shards, tmp_path, capsys):
    trainer = pretrain_in_process(run_args(demo_shards, tmp_path / "run", "engine.peak_flops=2.5e11"))
    line = banner(capsys.readouterr().out)
    assert line.endswith("| MFU peak 250.0 GFLOP/s (config: engine.peak_flops) per device")
    assert logged_peak(trainer) == pytest.approx(2.5e11, rel=1e-9)
    # the numerator is the model's own count, the same one on every device
    assert trainer.info.flops_per_token == trainer.model.flops_per_token(32) > 0


def test_a_cpu_run_without_a_configured_peak_names_the_measured_matmul(demo_shards, tmp_path, capsys):
    trainer = pretrain_in_process(run_args(demo_shards, tmp_path / "run", "engine.peak_flops=0"))
    line = banner(capsys.readouterr().out)
    assert re.search(r"\| MFU peak [\d,.]+ [GT]FLOP/s \(measured: fp32 matmul on cpu\) per device$", line), line
    assert trainer.peak.source == "measured: fp32 matmul on cpu"
    assert logged_peak(trainer) == pytest.approx(trainer.peak.value, rel=1e-9)


def test_a_run_on_a_known_device_names_the_table(demo_shards, tmp_path, capsys, monkeypatch):
    """The banner of a run whose device the table knows (the lookup is pointed at a fake H100 name
    while the run itself stays on the CPU)."""
    from mmtrain.train import engine as engine_module

    real = engine_module.peak_flops

    def as_if_on_h100(device, precision, configured=0.0, **kwargs):
        assert device.type == "cpu"
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
        monkeypatch.setattr(engine_module, "tf32_matmuls_enabled", lambda: False)
        return real(CUDA, precision, configured, **kwargs)

    monkeypatch.setattr(engine_module, "peak_flops", as_if_on_h100)
    trainer = pretrain_in_process(run_args(demo_shards, tmp_path / "run", "engine.peak_flops=0"))
    line = banner(capsys.readouterr().out)
    assert line.endswith("| MFU peak 66.9 TFLOP/s (table: NVIDIA H100 SXM fp32 dense "
                         "(NVIDIA H100 Tensor Core GPU data sheet)) per device")
    assert logged_peak(trainer) == pytest.approx(66.9e12, rel=1e-9)
