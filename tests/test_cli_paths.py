"""Output paths and option errors of the command line: refused up front, in one line, without touching earlier
results; and the shell scripts' install step."""
import os
import subprocess
from pathlib import Path

import pytest

from reflectevo.cli import main

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = "/nonexistent/model"  # loading it would fail: an --out error must come before the model is loaded


def _one_line_error(capsys, code):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    return err[0]


@pytest.fixture
def places(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x\n")
    return tmp_path


@pytest.mark.parametrize("command, out, option", [
    ("generate", "adir", "--out"),
    ("generate", "afile/raw.jsonl", "--out"),
    ("eval", "adir", "--out"),
    ("eval", "afile/sub/result.json", "--out"),
    ("eval", "--trial1-cache afile/t1.jsonl", "--trial1-cache"),
])
def test_unwritable_output_is_refused_before_the_model_loads(places, capsys, command, out, option):
    if out.startswith("--"):
        extra = [out.split()[0], str(places / out.split()[1]), "--out", str(places / "result.json")]
    else:
        extra = ["--out", str(places / out)]
    code = main([command, "--task", "arithmetic", "--limit", "1", "--model", NO_MODEL, *extra])
    line = _one_line_error(capsys, code)
    assert option in line and NO_MODEL not in line


def test_eval_own_raw_file_as_trial1_cache_refused_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "base.json"
    code = main(["eval", "--task", "arithmetic", "--limit", "1", "--model", NO_MODEL, "--out", str(out),
                 "--trial1-cache", str(tmp_path / "base.raw.jsonl")])
    assert "--trial1-cache" in _one_line_error(capsys, code)


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("bad", [["--kv-cache-gib", "-1"], ["--max-num-seqs", "0"], ["--device", "tpu"]])
def test_engine_options_checked_before_the_model_loads(tmp_path, capsys, command, bad):
    code = main([command, "--task", "arithmetic", "--limit", "1", "--model", NO_MODEL,
                 "--out", str(tmp_path / "out.json"), *bad])
    assert bad[0] in _one_line_error(capsys, code)


def test_cuda_device_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = main(["generate", "--task", "arithmetic", "--limit", "1", "--model", NO_MODEL, "--device", "cuda",
                 "--out", str(tmp_path / "raw.jsonl")])
    assert "--device cuda" in _one_line_error(capsys, code)


def test_curate_out_that_is_a_file(places, capsys):
    raw = places / "raw.jsonl"
    raw.write_text("")
    line = _one_line_error(capsys, main(["curate", str(raw), "--out", str(places / "afile")]))
    assert "--out" in line and (places / "afile").read_text() == "x\n"


@pytest.mark.parametrize("out", ["adir", "afile/kernels.json", "kernels.md"])
def test_bench_out_checked_before_any_benchmark_runs(places, capsys, monkeypatch, out):
    from reflectevo.bench import runner

    def must_not_run(*a, **k):
        raise AssertionError("a benchmark ran before --out was checked")

    monkeypatch.setattr(runner, "run_bench", must_not_run)
    line = _one_line_error(capsys, main(["bench", "kernels", "--out", str(places / out)]))
    assert "--out" in line


@pytest.mark.parametrize("bad", [["--n-train", "0"], ["--n-eval", "-1"], ["--model", NO_MODEL],
                                 ["--task", "logiqa"], ["--kv-cache-gib", "0"], ["--device", "tpu"],
                                 # checked before the model loads: the error names the option, not the model
                                 *([opt, v, "--model", NO_MODEL] for opt, v in (
                                     ("--sft-steps", "-5"), ("--dpo-steps", "0"), ("--max-length", "4"),
                                     ("--max-tokens", "0"), ("--reflection-max-tokens", "0")))])
def test_demo_bad_option_keeps_the_earlier_results(tmp_path, capsys, bad):
    out = tmp_path / "demo_out"
    (out / "sft" / "adapter").mkdir(parents=True)
    kept = {out / "raw.jsonl": '{"id": 1}\n', out / "eval_base.json": '{"acc_t1": 12.5}\n',
            out / "sft" / "adapter" / "adapter_config.json": "{}\n"}
    for path, text in kept.items():
        path.write_text(text)
    line = _one_line_error(capsys, main(["demo", "--out", str(out), "--n-train", "2", "--n-eval", "1", *bad]))
    assert bad[0] in line or bad[1] in line
    for path, text in kept.items():
        assert path.read_text() == text


def test_demo_out_that_is_a_file(places, capsys):
    line = _one_line_error(capsys, main(["demo", "--out", str(places / "afile"), "--model", NO_MODEL]))
    assert "--out" in line


def _fake_venv(tmp_path):
    """A venv whose python logs its arguments; it has torch but not reflectevo, so _venv.sh installs the package."""
    log = tmp_path / "calls.log"
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {log}
if [ "$1" = "-c" ] && [ "$2" != "import torch" ]; then exit 1; fi
exit 0
""")
    py.chmod(0o755)
    return log


@pytest.mark.parametrize("script, args, extra", [("demo.sh", ["--out", "somewhere"], ""),
                                                  ("test.sh", ["-k", "nf4"], "[dev]")])
def test_scripts_install_the_package_with_the_right_extra(tmp_path, script, args, extra):
    log = _fake_venv(tmp_path)
    env = dict(os.environ, REFLECTEVO_VENV=str(tmp_path / "venv"))
    r = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert f"-m pip install -q -e {ROOT}{extra}" in calls
    assert calls[-1].endswith(" ".join(args))  # the script's own arguments reach reflectevo demo / pytest


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Results written through a temp file + rename get the mode a plain open() gives (mkstemp alone: 0600)."""
    import os
    import stat

    from reflectevo.atomic import atomic_write_json
    from reflectevo.data.eval_run import write_json_atomic
    from reflectevo.data.jsonl import write_jsonl_atomic

    old = os.umask(0o022)
    os.umask(old)
    expected = 0o666 & ~old
    write_json_atomic(tmp_path / "result.json", {"acc_t1": 1.0})
    atomic_write_json(tmp_path / "state.json", {"step": 1})
    write_jsonl_atomic(tmp_path / "d_plus.jsonl", [{"id": 1}])
    with open(tmp_path / "plain.txt", "w"):
        pass
    for name in ("result.json", "state.json", "d_plus.jsonl", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
