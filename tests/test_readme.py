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
