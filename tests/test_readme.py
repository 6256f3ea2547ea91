"""The README's config table and commands stay true to the code."""
import dataclasses
import os
import re

from train import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_config_table_lists_every_key_with_its_default():
    table = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, flags=re.M))
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    assert set(fields) <= set(table), f"keys missing from the README: {set(fields) - set(table)}"
    config_keys = {k for k in table if k in fields}
    for key in config_keys:
        assert eval(table[key]) == fields[key], f"README says {key} = {table[key]}, train.py says {fields[key]!r}"


def test_commands_name_files_that_exist():
    for path in set(re.findall(r"\b((?:configs/)?\w+\.py)\b", README)):
        if path.startswith("configs/") or path in ("train.py", "eval.py", "push.py", "bench.py", "data.py", "model.py"):
            assert os.path.exists(os.path.join(ROOT, path)), path
    assert "pip install -r requirements.txt" in README and "\npytest" in README


def lines_of(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read().splitlines()


def test_reading_order_line_numbers_point_where_they_say():
    """'Read the code in this order' gives line numbers; they must follow the code when it moves."""
    model, data, train = lines_of("model.py"), lines_of("data.py"), lines_of("train.py")
    teach, quirks, end = map(int, re.search(r"`model.py` - the model. Lines 1-(\d+):.*?Lines (\d+)-(\d+):",
                                            README, flags=re.S).groups())
    assert quirks == teach + 1 and end == len(model) and model[quirks].startswith("# 10. Real-world quirks")
    teach, banner, end = map(int, re.search(r"`data.py` - .*?Lines 1-(\d+),.*?Lines (\d+)-(\d+), below one banner",
                                            README, flags=re.S).groups())
    assert banner == teach + 1 and end == len(data) and data[banner - 1].startswith("# =====")
    line = int(re.search(r"`render_pieces` at line (\d+)", README)[1])
    assert data[line - 1].startswith("def render_pieces(")
    teach, main, loop, loop_end, banner = map(int, re.search(
        r"`train.py` lines 1-(\d+) .*?`main` \(line (\d+); its loop, lines (\d+)-(\d+),.*?\(line (\d+) on\)",
        README, flags=re.S).groups())
    assert banner == teach + 1 and train[banner - 1].startswith("# =====")
    assert train[main - 1].startswith("def main(") and "# --- the loop" in train[loop - 1]
    assert train[loop_end].strip().startswith("# --- the end") or not train[loop_end].strip()
