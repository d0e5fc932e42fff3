"""Guards of eval / demo / curate: a resume never relabels another run's records, earlier results are never
deleted silently or before the options are checked, and an empty RAW file is an error."""
import json

import pytest
from test_loop import ITEMS, FakeTokenizer, ScriptedEngine, script_a

from reflectevo.cli import main
from reflectevo.data import get_task
from reflectevo.data.curate import curate_file
from reflectevo.data.eval_run import run_eval
from reflectevo.data.jsonl import DataError, read_jsonl
from reflectevo.data.loop import LoopConfig

NO_MODEL = "/nonexistent/model"  # loading it would fail: the guards must fire before the model is loaded


def _one_line_error(capsys, code):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    return err[0]


def _eval(out, resume=False, overwrite=False, **cfg):
    eng = ScriptedEngine(script_a)
    cfg = {"reasoning_source": NO_MODEL, "reflection_source": NO_MODEL, **cfg}
    res = run_eval(get_task("arithmetic"), ITEMS, eng, eng, FakeTokenizer(), out, LoopConfig(**cfg), log=None,
                   resume=resume, overwrite=overwrite)
    return res, eng


@pytest.mark.parametrize("changed, value", [
    ("reflection_source", f"{NO_MODEL} + adapter A"),   # --adapter A
    ("trial2_source", f"{NO_MODEL} + adapter B"),       # --trial2-adapter B
    ("seed", 7), ("max_tokens", 99), ("reflection_max_tokens", 33),
])
def test_eval_resume_with_other_settings_is_refused_before_generating(tmp_path, changed, value):
    out = tmp_path / "r.json"
    _eval(out)
    raw = tmp_path / "r.raw.jsonl"
    before = raw.read_text()
    eng = ScriptedEngine(script_a)
    cfg = {"reasoning_source": NO_MODEL, "reflection_source": NO_MODEL, changed: value}
    with pytest.raises(DataError, match=changed) as e:
        run_eval(get_task("arithmetic"), ITEMS, eng, eng, FakeTokenizer(), out, LoopConfig(**cfg), log=None,
                 resume=True)
    assert "\n" not in str(e.value) and str(raw) in str(e.value) and repr(value) in str(e.value)
    assert eng.calls == [] and raw.read_text() == before


def test_eval_resume_sources_checked_without_a_settings_file(tmp_path):
    # a raw file of an older run (no settings file): the records' reflection_source still tells the adapter
    out = tmp_path / "r.json"
    _eval(out)
    (tmp_path / "r.raw.settings.json").unlink()
    with pytest.raises(DataError, match=r"r\.raw\.jsonl:\d+: .*reflection_source"):
        _eval(out, resume=True, reflection_source="other + adapter A")


def test_eval_resume_with_the_same_settings_skips_the_done_questions(tmp_path):
    out = tmp_path / "r.json"
    first, _ = _eval(out)
    again, eng = _eval(out, resume=True)
    assert eng.calls == [] and again["acc_t2"] == first["acc_t2"]


def test_eval_refuses_to_delete_an_earlier_raw_file(tmp_path):
    out = tmp_path / "r.json"
    _eval(out)
    raw = tmp_path / "r.raw.jsonl"
    before = raw.read_text()
    with pytest.raises(DataError, match="--resume.*--overwrite"):
        _eval(out, seed=3)
    assert raw.read_text() == before
    _eval(out, overwrite=True, seed=3)  # starts over
    assert len(read_jsonl(raw)) == len(ITEMS)
    assert json.loads((tmp_path / "r.raw.settings.json").read_text())["seed"] == 3
    raw.write_text("")  # an empty raw file holds nothing to lose
    _eval(out)


def test_cli_eval_guards_fire_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "r.json"
    _eval(out)
    capsys.readouterr()  # the loop's progress lines
    base = ["eval", "--task", "arithmetic", "--limit", "4", "--model", NO_MODEL, "--out", str(out)]
    assert "--overwrite" in _one_line_error(capsys, main(base))
    adapter = tmp_path / "A"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}\n")
    line = _one_line_error(capsys, main(base + ["--resume", "--adapter", str(adapter)]))
    assert "reflection_source" in line and str(adapter) in line
    assert "seed" in _one_line_error(capsys, main(base + ["--resume", "--seed", "5"]))
    assert "--resume" in _one_line_error(capsys, main(base + ["--resume", "--overwrite"]))
    assert len(read_jsonl(tmp_path / "r.raw.jsonl")) == len(ITEMS)


def test_curate_empty_raw_is_an_error(tmp_path, capsys):
    raw = tmp_path / "RAW.jsonl"
    raw.write_text("")
    with pytest.raises(DataError, match="no records"):
        curate_file(raw, tmp_path / "cur")
    assert not (tmp_path / "cur").exists()
    line = _one_line_error(capsys, main(["curate", str(raw), "--out", str(tmp_path / "cur2")]))
    assert "no records" in line and not (tmp_path / "cur2").exists()



def test_generate_resume_with_another_adapter_is_refused(tmp_path):
    from reflectevo.data.loop import ReflectLoop

    raw = tmp_path / "RAW.jsonl"
    eng = ScriptedEngine(script_a)
    ReflectLoop(get_task("arithmetic"), eng, eng, FakeTokenizer(), LoopConfig(reflection_source="m"), log=None).run(
        ITEMS[:2], raw)
    eng = ScriptedEngine(script_a)
    loop = ReflectLoop(get_task("arithmetic"), eng, eng, FakeTokenizer(),
                       LoopConfig(reflection_source="m + adapter A"), log=None)
    with pytest.raises(DataError, match=r"RAW\.jsonl:2: .*reflection_source 'm'.*'m \+ adapter A'"):
        loop.run(ITEMS, raw)
    assert eng.calls == []


def test_generate_rerun_with_other_settings_is_refused_before_the_model_loads(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    args = ["generate", "--task", "arithmetic", "--limit", "2", "--model", NO_MODEL, "--out", str(raw)]

    def last_error(code):
        assert code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert NO_MODEL in last_error(main([*args, "--n-reflections", "2", "--seed", "0"]))  # got as far as the model
    assert json.loads((tmp_path / "raw.settings.json").read_text())["n_reflections"] == 2
    raw.write_text('{"id": 0}\n')  # records of that run
    for changed in (["--n-reflections", "3", "--seed", "0"], ["--n-reflections", "2", "--seed", "7"]):
        line = _one_line_error(capsys, main([*args, *changed]))
        assert "was written with" in line and NO_MODEL not in line
    assert NO_MODEL in last_error(main([*args, "--n-reflections", "2", "--seed", "0"]))  # same settings: goes on
