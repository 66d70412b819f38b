"""Tokenize the embedded English text (Wikipedia excerpt + Lee news corpus) with SmolLM2's tokenizer.

Writes a uint16 .npy of token ids (documents joined with EOS). Run on a CPU machine with the demo extras;
the GPU machine, which has no network and no gensim, reads the file.

    python benchmarks/prepare_tokens.py --out .gpu/english_tokens.npy

``--extra`` adds text files as documents, one per file; the documents are then shuffled (seed 0), so that the
last 5 %, which the convergence script holds out, comes from every source. More English prose, 2.8M tokens, is
in Debian's Python documentation (its reStructuredText sources):

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pydoc
    python benchmarks/prepare_tokens.py --extra 'pydoc/usr/share/doc/python3.11/html/_sources/**/*.rst.txt' \
        --out .gpu/english_pydoc_tokens.npy
"""

import argparse
import glob
import random

import numpy as np
from transformers import AutoTokenizer

from te_llama.commands.assets import english_text, smollm2_checkpoint, wiki_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--extra", default=None, help="glob of more text files (** allowed), one document each")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    documents = wiki_text().split("\n\n") + english_text().splitlines()
    if args.extra:
        paths = sorted(glob.glob(args.extra, recursive=True))
        if not paths:
            raise SystemExit(f"--extra {args.extra!r} matches no file")
        documents += [open(path, encoding="utf-8").read() for path in paths]
        random.Random(0).shuffle(documents)
    ids: list[int] = []
    for document in documents:
        if document.strip():
            ids.extend(tokenizer(document.strip()).input_ids + [tokenizer.eos_token_id])
    array = np.asarray(ids, dtype=np.uint16)
    np.save(args.out, array)
    print(f"{len(documents)} documents, {len(array):,} tokens -> {args.out}")


if __name__ == "__main__":
    main()
