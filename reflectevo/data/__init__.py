"""Data side of reflectevo: tasks and answer checkers, the MBPP sandbox, prompts, curation, metrics, JSONL I/O.

    from reflectevo.data import get_task
    task = get_task("logiqa" | "math" | "mbpp" | "bigbench" | "bigbench-free" | "arithmetic")
    items = task.load(path=None, limit=None)     # file tasks need a path; "arithmetic" is generated
    task.check(prediction, item) -> bool         # prediction = the answer inside the action
"""
from . import prompts
from .curate import curate_file, curate_records, heuristic_preference, make_output, make_raw_record, split_of
from .evaluate import evaluate_file, evaluate_records, format_table
from .instructions import DEFAULT_DEMAND, DEMANDS, Demand, parse_demand, sample_demand
from .jsonl import DataError, append_jsonl, completed_ids, iter_jsonl, read_jsonl, write_jsonl_atomic
from .prompts import DEFAULT as DEFAULT_PROMPTS
from .prompts import Prompts, Trial, extract_answer, format_action, load_prompt_overrides, observation
from .sandbox import SandboxResult, run_many, run_program, sandbox_mode
from .tasks import TASKS, Task, get_task
from .verifiers import check_choice, exact_match, f1_score, parse_choice
from .math_equiv import is_equiv, last_boxed, normalize_answer

__all__ = [
    "get_task", "TASKS", "Task", "DataError",
    "read_jsonl", "iter_jsonl", "append_jsonl", "write_jsonl_atomic", "completed_ids",
    "prompts", "Prompts", "DEFAULT_PROMPTS", "Trial", "extract_answer", "format_action", "observation",
    "load_prompt_overrides",
    "Demand", "DEMANDS", "DEFAULT_DEMAND", "parse_demand", "sample_demand",
    "curate_file", "curate_records", "heuristic_preference", "split_of", "make_output", "make_raw_record",
    "evaluate_records", "evaluate_file", "format_table",
    "run_program", "run_many", "SandboxResult", "sandbox_mode",
    "check_choice", "parse_choice", "exact_match", "f1_score", "is_equiv", "last_boxed", "normalize_answer",
]
