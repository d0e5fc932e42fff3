"""`reflectevo bench` checks --device before any work and never replaces a good result with a failure; paths the
system refuses end in one line."""
import json

import pytest
import torch

from reflectevo.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_bench_refuses_cuda_without_a_gpu(tmp_path, capsys):
    assert main(["bench", "kernels", "--device", "cuda", "--out", str(tmp_path / "k.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reflectevo bench: error: --device cuda: CUDA is not available on this machine"]
    assert not (tmp_path / "k.json").exists()


def test_bench_refuses_an_unknown_device(capsys):
    assert main(["bench", "kernels", "--device", "tpu"]) == 2
    assert "--device tpu: expected cpu or cuda" in capsys.readouterr().err


def test_a_failed_benchmark_keeps_the_earlier_files(tmp_path, monkeypatch, capsys):
    import reflectevo.bench.runner as runner

    out = tmp_path / "sampler.json"
    out.write_text(json.dumps({"sampler": {"tokens_per_s": 1.0}}))
    out.with_suffix(".md").write_text("good table\n")

    def failing(what, device=None, quick=False, on_result=None):
        results = {"sampler": {"error": "RuntimeError: boom"}}
        on_result(results, "### sampler: FAILED (RuntimeError: boom)")
        return results, ""

    monkeypatch.setattr(runner, "run_bench", failing)
    assert main(["bench", "sampler", "--device", "cpu", "--out", str(out)]) == 1
    assert json.loads(out.read_text()) == {"sampler": {"tokens_per_s": 1.0}}
    assert out.with_suffix(".md").read_text() == "good table\n"
    assert "FAILED" in capsys.readouterr().out


def test_an_unwritable_path_is_one_line(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    trial = {"generated_answer": "1", "reflections": [], "scratchpad": "Thought: x\nAction: Finish[1]",
             "is_correct": True, "error": "", "trail": 1, "reasoning_source": "m", "reflection_source": "N/A",
             "reason_prompt": "p", "reflection_prompt": ""}
    raw.write_text(json.dumps({"id": 1, "question": "q", "answer": "1", "output": [trial]}) + "\n")
    rc = main(["curate", str(raw), "--out", "/proc/reflectevo-no-such/cur"])  # the kernel refuses the folder
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("reflectevo curate: error:") and "/proc/reflectevo-no-such" in err[0]


def test_sampler_table_names_versions_and_date():
    from reflectevo.bench import sampler
    from reflectevo.bench.common import env_info

    env = env_info("cpu")
    table = sampler.format_table({"env": env, "reflectevo_shape": {"error": "no model"}})
    first = table.splitlines()[0]
    assert env["date"] in first and f"torch {env['torch']}" in first and f"triton {env['triton']}" in first
