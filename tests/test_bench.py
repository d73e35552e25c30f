"""The benchmark machinery (not speed: timing never decides a test)."""
import dataclasses
import json
import os

import pytest
import torch

import bignlp_fast.bench
from bignlp_fast import cli
from bignlp_fast.bench import all_cases, cases, format_table, run_case, tiny_cases


def test_every_case_has_a_reference_and_a_cost():
    for case in all_cases():
        assert case.ref_name and (case.bytes or case.flops), case.id
        assert set(case.suites) <= {"quick", "full", "gpu"}


def test_a_case_without_the_float64_check_reports_no_error():
    """Case.check_error=False (the GPU suite's long sequences): the row says "-", not a number."""
    case = dataclasses.replace(next(c for c in tiny_cases() if c.op == "attention"), check_error=False)
    row = run_case(case, torch.device("cpu"), repeats=2)
    assert row.max_err is None and row.ref_max_err is None and row.ms > 0
    cells = [c.strip() for c in format_table([row]).splitlines()[2].strip("|").split("|")]
    assert cells[-2:] == ["-", "-"]


def test_gpu_suite_refuses_the_cpu(capsys):
    assert cli.main(["bench", "--gpu", "--device", "cpu"]) == 2
    assert "needs --device cuda" in capsys.readouterr().err
    gpu = cases("gpu")
    assert {c.op for c in gpu} == {"attention", "rnn", "conv", "text_cnn_pool", "causal_conv1d"}
    assert {c.dtype for c in gpu if c.op != "rnn"} == {torch.bfloat16}  # the RNN layers in fp32 too
    assert {c.shape[0] for c in gpu if c.op == "rnn"} == {4, 16, 64}  # batch 4 to 64 against cuDNN


def test_an_output_path_that_cannot_be_written_is_said_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bignlp_fast.bench, "run_case", lambda *a, **k: pytest.fail("ran a case before saying so"))
    assert cli.main(["bench", "--json", str(tmp_path / "no" / "such" / "out.json")]) == 2
    assert "--json" in capsys.readouterr().err
    assert cli.main(["bench", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert cli.main(["bench", "--json", "/proc/out.json"]) == 2  # a folder root may "write", that takes no file
    assert "cannot be written" in capsys.readouterr().err
    assert cli.main(["bench", "--json", ""]) == 2
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    assert cli._writable(str(kept), "--json", "bench") and kept.read_text() == "{}"  # tried, left as it was
    assert cli._writable(str(tmp_path / "new.json"), "--json", "bench") and not (tmp_path / "new.json").exists()
    interpret = os.environ.get("TRITON_INTERPRET")
    assert cli.main(["triton-compile", "--json", str(tmp_path / "no" / "out.json")]) == 2
    assert os.environ.get("TRITON_INTERPRET") == interpret  # refused before it turns the interpreter off


def test_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--repeats", "0"])
    assert "--repeats: must be at least 1, got 0" in capsys.readouterr().err


def test_repeated_filters_select_the_cases_matching_any():
    got = [c.id for c in cli.select("full", ["rnn-GRU-fwd-4x", "rnn-LSTM-fwd-4x"])]
    assert got == ["rnn-LSTM-fwd-4x512x512x128-float32", "rnn-GRU-fwd-4x512x512x128-float32"]
    assert len(cli.select("full", None)) == len(cases("full"))


@pytest.mark.parametrize("case", tiny_cases(), ids=lambda c: c.id)
def test_run_case_reports_every_column(case):
    row = run_case(case, torch.device("cpu"), repeats=2, copy_rate=10.0)
    assert row.backend == "cpu" and row.ms > 0 and row.ref_ms > 0 and row.speedup > 0
    assert (row.gbps > 0 and row.pct_of_copy > 0) if case.bytes else row.gflops > 0
    assert row.peak_mb >= 0 and row.ref_peak_mb >= 0
    assert row.max_err < 1e-4 and row.ref_max_err < 1e-4
    assert case.op in format_table([row])
    if case.bytes:
        assert row.copy_gbps == 10.0 and row.pct_of_copy == pytest.approx(100 * row.gbps / 10.0)


def test_a_named_backend_runs_the_whole_model_cases_too(monkeypatch):
    """--backend torch on a case that runs whole modules (the LSTMCell case): their ops take it too (by
    BIGNLP_FAST_BACKEND for the case), so the row's label is what ran; the environment is restored."""
    case = next(c for c in cases("full") if c.id.startswith("rnn-LSTMCell"))
    monkeypatch.delenv("BIGNLP_FAST_BACKEND", raising=False)
    seen = []
    real = bignlp_fast._backend.choose
    monkeypatch.setattr(bignlp_fast._backend, "choose", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    row = run_case(case, torch.device("cpu"), backend="torch", repeats=1, copy_rate=10.0)
    assert row.backend == "torch" and set(seen) == {"torch"}
    assert "BIGNLP_FAST_BACKEND" not in os.environ


def test_memory_bound_case_measures_the_copy_around_it():
    case = next(c for c in tiny_cases() if c.bytes)
    row = run_case(case, torch.device("cpu"), repeats=2)
    assert row.copy_gbps > 0 and row.pct_of_copy == pytest.approx(100 * row.gbps / row.copy_gbps)
    assert "copy rate around each memory-bound case" in format_table([row])


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--filter", "bias_gelu-fwd-8192x768-float32", "--repeats", "2",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bias_gelu" in printed and "copy rate measured at the start of this run" in printed
    assert "copy rate around each memory-bound case" in printed
    data = json.loads(out.read_text())
    assert data["rows"][0]["case"] == "bias_gelu-fwd-8192x768-float32" and data["copy_gbps"] > 0
    assert data["rows"][0]["copy_gbps"] > 0


def test_cli_bench_skips_what_the_named_backend_cannot_run(tmp_path, monkeypatch, capsys):
    """--backend X: the cases X cannot run (its dtype or device, found before any timing; or a limit of
    the call, a BackendError while running) are listed as skipped with the reason, the others still
    give rows and JSON, instead of a traceback that loses every row."""
    import bignlp_fast.bench as bench
    from bignlp_fast._backend import BackendError
    monkeypatch.delenv("TRITON_INTERPRET")  # the triton backend cannot run CPU tensors now
    assert cli.main(["bench", "--filter", "bias_gelu-fwd-8192x768-float32", "--backend", "triton"]) == 2
    assert "backend 'triton' can run none of the selected cases on cpu" in capsys.readouterr().err

    def fake_run_case(case, device, backend, repeats):  # the CLI's handling is under test, not timing
        if "fwd+bwd" in case.id:
            raise BackendError(f"{case.op}: backend {backend!r} cannot run this call: a limit of the call")
        return bench.Row(case.id, case.name, case.mode, "x", "float32", backend, 1.0, 1.0, 1.0, None, None, None, None,
                         0.0, 0.0, None, None, case.ref_name)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench, "run_case", fake_run_case)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--full", "--filter", "distillation_loss-T=2-alpha=0.5-fwd", "--filter",
                     "causal_conv1d-width-4-+-silu-fwd", "--backend", "triton", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["case"] for r in data["rows"]] == ["causal_conv1d-width-4-+-silu-fwd-8x1024x2048-float32",
                                                 "causal_conv1d-width-4-+-silu-fwd-8x1024x2048-bfloat16"]
    skipped = {s["case"]: s["reason"] for s in data["skipped"]}
    assert all("no Triton kernel for distillation_loss" in skipped[c] for c in skipped if "distillation" in c)
    assert len([c for c in skipped if "distillation" in c]) == 4 and len(skipped) == 6  # + 2 causal fwd+bwd
    assert "skipped distillation_loss-T=2-alpha=0.5-fwd-512x30522-float32" in printed


def test_cli_bench_rejects_an_empty_selection(capsys):
    assert cli.main(["bench", "--filter", "no-such-case"]) == 2
    assert "no case" in capsys.readouterr().err


def test_cli_plot_needs_matplotlib_and_says_so(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(bignlp_fast.bench, "run_case", lambda *a, **k: pytest.fail("ran a case before saying so"))
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        cli.main(["bench", "--filter", "bias_gelu-fwd-8192x768-float32", "--repeats", "1",
                  "--plot", str(tmp_path / "p.png")])
