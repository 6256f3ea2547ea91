"""Run llama.cpp's convert_hf_to_gguf.py on a small-vlm export whose byte-level BPE
tokenizer has no pre-tokenizer hash in llama.cpp's table.

usage: python tests/client_gguf_text.py LLAMA_CPP_DIR EXPORT_DIR [convert_hf_to_gguf.py args...]

The export's tokenizer.json uses the ByteLevel pre-tokenizer with use_regex=true, i.e.
exactly GPT-2's split regex, so "gpt-2" is the right tokenizer.ggml.pre. The converter
only knows pre-tokenizers by a hash of a trained tokenizer's output, and raises for an
unknown one; we answer "gpt-2" for this case only (and check the pre-tokenizer first).
"""
import json
import runpy
import sys
from pathlib import Path

llama_dir = Path(sys.argv.pop(1))
export_dir = Path(sys.argv[1])

pre = json.loads((export_dir / "tokenizer.json").read_text())["pre_tokenizer"]
if pre != {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}:
    sys.exit(f"unexpected pre-tokenizer {pre}: gpt-2 would be wrong")

sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
from conversion.base import TextModel  # noqa: E402

known = TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"


TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = str(llama_dir / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
