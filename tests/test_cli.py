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
