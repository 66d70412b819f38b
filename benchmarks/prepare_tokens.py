"""Tokenize the embedded English text (Wikipedia excerpt + Lee news corpus) with SmolLM2's tokenizer.

Writes a uint16 .npy of token ids (documents joined with EOS). Run on a CPU machine with the demo extras;
the GPU machine, which has no network and no gensim, reads the file.

    python benchmarks/prepare_tokens.py --out .gpu/english_tokens.npy
"""

import argparse

import numpy as np
from transformers import AutoTokenizer

from te_llama.assets import english_text, smollm2_checkpoint, wiki_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    documents = wiki_text().split("\n\n") + english_text().splitlines()
    ids: list[int] = []
    for document in documents:
        if document.strip():
            ids.extend(tokenizer(document.strip()).input_ids + [tokenizer.eos_token_id])
    array = np.asarray(ids, dtype=np.uint16)
    np.save(args.out, array)
    print(f"{len(documents)} documents, {len(array):,} tokens -> {args.out}")


if __name__ == "__main__":
    main()
