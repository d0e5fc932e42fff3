"""``reflectevo generate --adapter`` with a one-stage SFT adapter (setting I): that model answers a reflection request
with a reflection AND a new attempt, so its "reflections" would hold an answer that trial 2 copies (and D+ would
teach it). generate says so in one warning line, before the model loads; other adapters get no warning."""
from __future__ import annotations

import json
import os

import pytest


def _run_dir(tmp_path, name, config):
    run = tmp_path / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps(config))
    return str(run / "adapter") + "/"


@pytest.mark.parametrize("config,warned", [({"kind": "sft", "mode": "one-stage"}, True),
                                           ({"kind": "sft", "mode": "reflect"}, False),
                                           ({"kind": "dpo"}, False)])
def test_generate_warns_about_a_one_stage_adapter(tmp_path, capsys, monkeypatch, config, warned):
    from reflectevo import cli_loop
    from reflectevo.cli import main

    class Stop(BaseException):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(cli_loop, "load_generation_model", stop)
    adapter = _run_dir(tmp_path, "run", config)
    with pytest.raises(Stop):
        main(["generate", "--task", "arithmetic", "--limit", "2", "--adapter", adapter,
              "--out", str(tmp_path / "raw.jsonl")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "one-stage" in ln]
    if not warned:
        assert lines == []
        return
    assert len(lines) == 1 and lines[0].startswith("generate: warning: --adapter " + os.path.normpath(adapter))
    assert "config.json" in lines[0] and "reflect" in lines[0]
