"""README.md and docs/*.md stay true to the code, and read as a user's guide (no log of how it got here)."""
import ast
import dataclasses
import glob
import os
import re

from conftest import ROOT
from run import Config



def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


README = read("README.md")
DOCS = {os.path.relpath(path, ROOT): read(path) for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))}
PAGES = {"README.md": README, **DOCS}


def test_config_table_lists_every_key_with_its_default():
    table = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, flags=re.M))
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    assert set(fields) <= set(table), f"keys missing from the README: {set(fields) - set(table)}"
    config_keys = {k for k in table if k in fields}
    for key in config_keys:
        assert eval(table[key]) == fields[key], f"README says {key} = {table[key]}, run.py says {fields[key]!r}"


# Files the pages name that are not this project's: LLaVA's and llama.cpp's scripts, a user's config in
# an error message.
OUTSIDE_FILES = {"finetune_lora.sh", "convert_hf_to_gguf.py", "x.py"}


def test_commands_name_files_that_exist():
    """Every project file a page names (`train.py`, `configs/demo.py`, `data/demo/prepare.py`,
    `tests/gpu_check.sh`, ...) and every page it links exists. A name after `/` or `.` is another
    project's path (llama.cpp/convert_hf_to_gguf.py) and is left alone."""
    for page, text in PAGES.items():
        named = set(re.findall(r"(?<![\w/.-])((?:configs/|tests/|data/demo/|docs/)?\w+\.(?:py|sh))\b", text))
        assert {"train.py", "run.py"} <= named or page != "README.md", named
        for path in named - OUTSIDE_FILES:
            if path.startswith("test_"):  # test_data.py::test_name: a file of tests/
                path = os.path.join("tests", path)
            assert os.path.exists(os.path.join(ROOT, path)), f"{page} names {path}, which does not exist"
        for link in re.findall(r"\]\(([^)#\s]+)\)", text):
            if not re.match(r"\w+://", link):
                target = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), link))
                assert os.path.exists(target), f"{page} links {link}, which does not exist"
    for command in ("pip install -r requirements.txt", "deepspeed train.py configs/demo.py",
                    "python eval.py out/demo --data data/demo/eval.jsonl", "python -m pytest",
                    'python -m pytest -m "not slow"', "python data/demo/prepare.py"):
        assert command in README, command
    for page in DOCS:
        assert f"({page})" in README, f"the README does not link {page}"


def test_named_tests_exist():
    """The tests a page names (`test_x.py::test_name`, or `test_name` alone) are tests of the suite."""
    defined = {}
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        defined[os.path.basename(path)] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    everywhere = set().union(*defined.values())
    for page, text in PAGES.items():
        for code in re.findall(r"`([^`\n]+)`", text):
            node = re.fullmatch(r"(?:tests/)?(test_\w+\.py)::(test_\w+)", code)
            if node:
                assert node[2] in defined.get(node[1], ()), f"{page} names {code}, which is no test"
            elif re.fullmatch(r"test_\w+", code):
                assert code in everywhere, f"{page} names {code}, which is no test"


def top_level_names(path):
    """What a file defines at its top level (functions, classes, constants), and its classes' methods."""
    tree = ast.parse(read(path))
    names, methods = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            methods[node.name] = {m.name for m in node.body if isinstance(m, ast.FunctionDef)}
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names.add(target.id)
    return names, methods


def test_reading_order_names_what_each_file_defines():
    """'Read the code in this order' lists each file (an item `N. **`file.py`**`) and, in backticks,
    the names to look for in it: `name`, `name()` or `Class.method`. Each must be defined in that
    file, at its top level or as a method of one of its classes, so a rename fails here until the
    README follows."""
    section = README[README.index("## Read the code in this order"):]
    section = section[:section.index("\n## ", 1)]
    items = re.split(r"^\d+\. \*\*`([\w/]+\.py)`\*\*", section, flags=re.M)[1:]
    files = dict(zip(items[::2], items[1::2]))
    assert list(files) == ["model.py", "data.py", "train.py", "run.py", "eval.py", "push.py", "bench.py"]
    for path, text in files.items():
        names, methods = top_level_names(path)
        listed = [m for m in re.findall(r"`([^`\n]+)`", text)
                  if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?(\(\))?", m)]
        assert len(listed) >= 3, f"the reading order names too little of {path}: {listed}"
        for name in listed:
            name = name.removesuffix("()")
            if "." in name:
                cls, method = name.split(".")
                assert method in methods.get(cls, ()), f"README: {path} has no {name}"
            else:
                assert name in names or any(name in m for m in methods.values()), f"README: {path} defines no {name}"


# A log of how the code got here belongs in git, not in a guide: no dates, commit hashes, the
# machinery's paths and words, or "before that change".
DATE = re.compile(r"\b(?:19|20)\d\d-[01]\d\b")
COMMIT = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
HISTORY = ("../shared", "session", "before that change", "the latest", "previous round", "as it was before")


def test_pages_read_as_a_guide_not_a_log():
    assert len(README.splitlines()) <= 400, f"README.md has {len(README.splitlines())} lines; keep it <= 400"
    for page, text in PAGES.items():
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{page}:{number}: {line.strip()[:80]}"
            assert not DATE.search(line), f"a date in {where}"
            assert not COMMIT.search(line), f"a commit hash in {where}"
            assert not any(word in line.lower() for word in HISTORY), f"a log's words in {where}"
