"""`--adapter run/adapter/` and `--adapter ./run//adapter` name the same adapter as `run/adapter` (the records'
source names and the resume check compare that text)."""
import argparse

from reflectevo.cli_loop import add_eval_args, add_generate_args


def test_adapter_spellings_normalise_to_one_name():
    for add in (add_eval_args, add_generate_args):
        p = argparse.ArgumentParser()
        add(p)
        base = ["--task", "arithmetic", "--out", "o.json"]
        names = {p.parse_args(base + ["--adapter", a]).adapter for a in ("run/adapter", "run/adapter/",
                                                                        "./run//adapter")}
        assert names == {"run/adapter"}
        assert p.parse_args(base).adapter is None
    p = argparse.ArgumentParser()
    add_eval_args(p)
    assert p.parse_args(["--task", "arithmetic", "--out", "o.json", "--trial2-adapter", "c/adapter/"]).trial2_adapter \
        == "c/adapter"
