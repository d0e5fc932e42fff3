"""The command line surface of ../shared/docs/contract.md: every command and option exists and has --help."""
import subprocess
import sys

import pytest

from reflectevo.cli import build_parser, main

CONTRACT = {
    "generate": ["--task", "--data", "--model", "--adapter", "--out", "--limit", "--n-reflections", "--demand", "--seed"],
    "curate": ["--out"],
    "sft": ["--data", "--mode", "--model", "--out", "--qlora", "--resume", "--max-steps", "--epochs", "--max-length",
            "--batch-size", "--grad-accum", "--lr", "--lora-r", "--seed", "--save-every"],
    "dpo": ["--data", "--model", "--out", "--adapter", "--beta", "--loss", "--qlora", "--resume", "--max-steps",
            "--epochs", "--max-length", "--batch-size", "--grad-accum", "--lr", "--lora-r", "--seed", "--save-every"],
    "eval": ["--task", "--data", "--model", "--adapter", "--limit", "--out"],
    "demo": ["--out"],
    "bench": ["--out"],
}


@pytest.mark.parametrize("command", sorted(CONTRACT))
def test_help_lists_contract_options(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: reflectevo {command}")
    for option in CONTRACT[command]:
        assert option in text, (command, option)


def test_sft_modes_and_bench_families():
    parser = build_parser()
    for mode in ("one-stage", "reflect", "correct"):
        assert parser.parse_args(["sft", "--data", "d.jsonl", "--mode", mode, "--model", "m", "--out", "r"]).mode == mode
    for what in ("kernels", "sampler", "train"):
        assert parser.parse_args(["bench", what]).what == what


def test_module_entry_point_and_no_command():
    top = subprocess.run([sys.executable, "-m", "reflectevo", "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0
    for command in CONTRACT:
        assert command in top.stdout
    assert main([]) == 0


def test_user_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code = main(["curate", str(missing), "--out", str(tmp_path / "cur")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(missing) in err[0]


def test_bench_saves_each_result_as_it_lands_and_survives_a_failing_one(tmp_path, monkeypatch, capsys):
    import json
    import types

    from reflectevo.bench import runner

    seen_on_disk = []

    def make(name, fail):
        mod = types.ModuleType(name)

        def run(device):
            if fail:
                seen_on_disk.append(json.loads(out.read_text()))  # the first result is already saved
                raise RuntimeError("out of memory at shape 8192")
            return {"device": device, "ms": 1.5}

        mod.run = run
        mod.format_table = lambda res: f"### {name}\n| ms |\n| {res['ms']} |"
        monkeypatch.setitem(sys.modules, name, mod)
        return name

    monkeypatch.setitem(runner.FAMILIES, "kernels", [make("fake_bench.ok_one", False), make("fake_bench.bad", True),
                                                     make("fake_bench.ok_two", False)])
    out = tmp_path / "res" / "kernels.json"
    assert main(["bench", "kernels", "--device", "cpu", "--out", str(out)]) == 1
    assert seen_on_disk == [{"ok_one": {"device": "cpu", "ms": 1.5}}]
    saved = json.loads(out.read_text())
    assert saved["ok_one"] == saved["ok_two"] == {"device": "cpu", "ms": 1.5}
    assert saved["bad"] == {"error": "RuntimeError: out of memory at shape 8192"}
    table = out.with_suffix(".md").read_text()
    assert "### fake_bench.ok_one" in table and "### bad: FAILED" in table and "### fake_bench.ok_two" in table
    captured = capsys.readouterr()
    assert captured.out.count("### fake_bench.ok_one") == 1  # each table printed once, as it lands
    assert "benchmark(s) failed: bad" in captured.err
