"""Print what a SentencePiece tokenizer.model's normalizer does, and what llama.cpp would skip of it.

Usage: PYTHONPATH=$PWD python scripts/tokenizer_normalizer.py PATH/TO/tokenizer.model [...]
(e.g. a downloaded vivo-ai/BlueLM-7B-Chat snapshot's tokenizer.model). `unicode_normalization` is true when
the model carries a precompiled character map (nmt_nfkc and the other non-identity rules).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bluelm_cli.export.tokenizer_json import normalizer_description, read_model_proto, steps_llama_cpp_skips


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in paths:
        proto = read_model_proto(Path(path))
        report = {"file": path, **normalizer_description(proto), "llama_cpp_skips": steps_llama_cpp_skips(proto)}
        print(json.dumps(report, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
