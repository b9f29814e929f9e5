"""Run llama.cpp (llama-cpp-python) on a GGUF in a child process: tokenization and logits for a few prompts.

A child process keeps llama.cpp's OpenMP runtime apart from PyTorch's and turns a crash of the engine
(a bad CPU kernel, a file it cannot read) into an error message instead of taking the caller down.

    python -m toolkit.interop.llama_cpp_probe FILE.gguf REQUEST.json OUT_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError


def probe(path: Path, texts: list[str], ids: list[list[int]], threads: int = 2, timeout: float = 300) -> dict[str, Any]:
    """-> ``{"version", "tokens": [[...]], "logits": [array [len, vocab]]}`` for each prompt."""
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({"texts": texts, "ids": ids, "threads": threads}))
        proc = subprocess.run([sys.executable, "-m", __name__, str(path), str(request), tmp],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            last = proc.stderr.strip().splitlines()
            detail = f": {last[-1][:200]}" if last else ""
            raise ToolkitError(f"llama.cpp could not run {path.name} ({how}{detail}); "
                               "set export_gguf: {check_llama_cpp: false} to skip this check")
        result = json.loads((Path(tmp) / "result.json").read_text())
        result["logits"] = [np.load(Path(tmp) / f"logits{i}.npy") for i in range(len(ids))]
    return result


def main(path: str, request_file: str, out: str) -> None:
    import llama_cpp

    request = json.loads(Path(request_file).read_text())
    longest = max(len(x) for x in request["ids"])
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(longest, 16), n_batch=max(longest, 16), logits_all=True,
                          n_threads=request["threads"], verbose=False)
    tokens = [list(llm.tokenize(t.encode(), add_bos=False, special=False)) for t in request["texts"]]
    for i, ids in enumerate(request["ids"]):
        llm.reset()
        llm.eval(ids)
        np.save(Path(out) / f"logits{i}.npy", np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    (Path(out) / "result.json").write_text(json.dumps({"version": llama_cpp.__version__, "tokens": tokens}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
