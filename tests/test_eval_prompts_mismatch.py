"""eval warns (one line) when the adapter's run was trained with other --prompts than eval is given."""
import json

import pytest

from reflectevo import cli_loop
from reflectevo.cli import main
from reflectevo.data.one_stage import trained_prompts_mismatch


def _run(tmp_path, prompts):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"kind": "sft", "mode": "reflect", "prompts": prompts}))
    return str(run / "adapter")


def test_mismatch_rules(tmp_path):
    a, b, a_copy = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "a2.json"
    a.write_text(json.dumps({"retry_request": "Again: {question}"}))
    a_copy.write_text(json.dumps({"retry_request": "Again: {question}"}))
    b.write_text(json.dumps({"retry_request": "Once more: {question}"}))
    adapter = _run(tmp_path, str(a))
    assert trained_prompts_mismatch(adapter, str(a)) is None
    assert trained_prompts_mismatch(adapter, str(a_copy)) is None          # same content, other path
    assert "differ from training" in trained_prompts_mismatch(adapter, str(b))
    assert "default prompts" in trained_prompts_mismatch(adapter, None)
    assert trained_prompts_mismatch(None, str(a)) is None
    assert trained_prompts_mismatch(str(tmp_path / "nowhere" / "adapter"), str(a)) is None  # no run config


@pytest.mark.parametrize("trained,given,warned", [(False, False, False), (True, False, True), (True, True, False)])
def test_eval_logs_the_warning(trained, given, warned, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"retry_request": "Again: {question}"}))
    adapter = _run(tmp_path, str(prompts) if trained else None)

    class Stop(BaseException):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(cli_loop, "load_generation_model", stop)
    argv = ["eval", "--task", "arithmetic", "--limit", "2", "--adapter", adapter, "--out", str(tmp_path / "r.json")]
    with pytest.raises(Stop):
        main(argv + (["--prompts", str(prompts)] if given else []))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "trained with --prompts" in ln]
    assert len(lines) == int(warned)
    if warned:
        assert lines[0].startswith("eval: warning: ") and str(prompts) in lines[0]
