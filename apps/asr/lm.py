"""Recipe: the sample ASR app's n-gram LM from ../shared/data/text.

    python -m apps.asr.lm [--order 4] [--prune 0 0 1 1] [--out samples/asr/lm.arpa]
        [--held-out-voices cache/asr/valid.jsonl] [--real-text N] [--build-binary PATH]

Every sentence is normalized to the acoustic model's vocabulary.  Sentences
of the speech corpora (../shared/data/speech/*/transcripts.tsv) and of the
shipped test clips are left out, and so are the sentences the held-out voices
speak (``apps.asr.prepare``'s valid.jsonl, when it exists), so that the
held-out voices' score with the LM measures text the LM has not seen; 1% of
the sentences, chosen by a hash of their text, are held out to measure
perplexity, reported in samples/asr/LM.md.  ``--real-text N`` adds the
transcripts of the real training speech N times (never a held-out real
speaker's sentence).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from dsstream.lm import build_lm, normalize_sentence, read_corpus, write_arpa

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def corpus_files(shared: Path) -> list[tuple[Path, bool]]:
    """(file, one sentence per line) for every text in the shared data."""
    text = shared / "text"
    if not text.is_dir():
        raise SystemExit(f"missing {text}: the recipe reads the shared text data from there")
    files = [(text / "ljspeech_sentences.txt", True)]
    for folder in ("gutenberg", "nltk_state_union", "nltk_inaugural"):
        files += [(p, False) for p in sorted((text / folder).glob("*.txt"))]
    return files


def evaluation_sentences(shared: Path) -> set[str]:
    out = set()
    for tsv in sorted((shared / "speech").glob("*/transcripts.tsv")):
        for line in tsv.read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                out.add(normalize_sentence(line.split("\t", 1)[1]))
    return out


def spoken_by_held_out_voices(manifest: Path) -> set[str]:
    """The sentences of the held-out voices' utterances (a prepare manifest's
    ``text``); empty when the manifest does not exist."""
    from apps.asr.train import read_manifest

    return {row["text"] for row in read_manifest(manifest)} if manifest.is_file() else set()


def real_training_text(data: Path, shared: Path) -> list[str]:
    """The transcripts of the real speech the acoustic model trains on
    (``<data>/real_train.jsonl`` from apps.asr.corpora), without any sentence
    that a held-out real speaker (``real_dev``/``real_test``) or LJ001 says:
    speechocean762's speakers read the same prompts, so a dev speaker's
    sentence is often a training speaker's too."""
    from apps.asr.train import read_manifest

    path = data / "real_train.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: python -m apps.asr.corpora writes it")
    said = {normalize_sentence(line.split("\t", 1)[1])
            for line in (shared / "speech" / "lj001" / "transcripts.tsv")
            .read_text(encoding="utf-8").splitlines() if "\t" in line}  # fmt: skip
    for split in ("dev", "test"):
        held = data / f"real_{split}.jsonl"
        said |= {r["text"] for r in read_manifest(held)} if held.is_file() else set()
    return [r["text"] for r in read_manifest(path) if r["text"] not in said]


def held_out(sentence: str, percent: int = 1) -> bool:
    return int(hashlib.sha1(sentence.encode()).hexdigest()[:8], 16) % 100 < percent


# A recipe's script (options, text, build, report), read top to bottom;
# over ~60 lines.
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--prune", type=int, nargs="+", default=[0, 0, 1, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "samples" / "asr" / "lm.arpa")
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--templates", type=int, default=5,
                        help="times each VQA question form is added to the text")  # fmt: skip
    parser.add_argument("--held-out-voices", type=Path,
                        default=ROOT / "cache" / "asr" / "valid.jsonl",
                        help="a manifest whose sentences are left out")  # fmt: skip
    parser.add_argument("--real-text", type=int, default=0, metavar="N",
                        help="add the real training speech's transcripts N times "
                        "(apps.asr.corpora's real_train.jsonl, held-out speakers' "
                        "sentences left out)")  # fmt: skip
    parser.add_argument("--data", type=Path, default=ROOT / "cache" / "asr",
                        help="where apps.asr.corpora wrote its manifests")  # fmt: skip
    parser.add_argument("--build-binary", metavar="PATH",
                        help="KenLM's build_binary: also write <out>.bin, which the server "
                        "loads in a millisecond (see dsstream.lm.binary)")  # fmt: skip
    args = parser.parse_args(argv)

    excluded = evaluation_sentences(args.shared)
    # The shipped clips' sentences: a test decodes them, so the LM must not
    # have memorized them (the held-out voice's is in no manifest any more).
    clips = ROOT / "samples" / "asr" / "clips" / "transcripts.tsv"
    if clips.is_file():
        excluded |= {line.split("\t", 1)[1] for line in clips.read_text().splitlines()
                     if "\t" in line}  # fmt: skip
    spoken = spoken_by_held_out_voices(args.held_out_voices)
    if not spoken:
        print(f"{args.held_out_voices} not found: no held-out voices' sentences to leave out")
    train, heldout, left_out = [], [], set()
    for path, one_per_line in corpus_files(args.shared):
        for sentence in read_corpus(path, one_per_line):
            if sentence in excluded:
                continue
            if sentence in spoken:
                left_out.add(sentence)
                continue
            (heldout if held_out(sentence) else train).append(sentence.split())
    # The VQA question forms, so spoken questions are likely word sequences
    # (repeated: a handful of templates against a few hundred thousand sentences).
    from apps.vqa.scenes import all_template_texts

    train += [t.split() for t in all_template_texts() for _ in range(args.templates)]
    real = real_training_text(args.data, args.shared) if args.real_text else []
    train += [t.split() for t in real for _ in range(args.real_text)]
    words = sum(len(s) for s in train)
    print(f"{len(train)} training sentences ({words} words), {len(heldout)} held out")
    t0 = time.time()
    model = build_lm(train, args.order, args.prune)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_arpa(model, args.out)
    seconds = time.time() - t0
    import kenlm

    lm = kenlm.Model(str(args.out))
    log10 = sum(lm.score(" ".join(s), bos=True, eos=True) for s in heldout)
    tokens = sum(len(s) + 1 for s in heldout)
    ppl = 10 ** (-log10 / tokens) if tokens else float("nan")  # a tiny corpus may hold none out
    oov = sum(w not in lm for s in heldout for w in s) / max(1, tokens - len(heldout))
    sizes = [len(t) for t in model.probs]
    mb = args.out.stat().st_size / 1e6
    print(
        f"built in {seconds:.0f} s: {sizes} n-grams, {mb:.1f} MB; held-out ppl {ppl:.1f}, "
        f"OOV {oov:.2%}"
    )
    real_words = (
        f"\nThe transcripts of the acoustic model's real training speech ({len(real)} "
        f"utterances, {args.real_text} time(s) each; apps.asr.corpora) are added, "
        "without any sentence a held-out real speaker or LJ001 says."
        if real else ""
    )  # fmt: skip
    binary_note = ""
    if args.build_binary:
        from dsstream.lm.binary import write_binary

        binary = write_binary(args.out, args.out.with_suffix(".bin"), args.build_binary)
        binary_note = (
            f"\n- `{binary.name}` (and its word list `{binary.name}.vocab`): the same model in "
            f"KenLM's trie format, {binary.stat().st_size / 1e6:.1f} MB, the same scores; "
            "servers load it by mapping the file instead of parsing the ARPA."
        )
    card = args.out.with_name("LM.md")
    card.write_text(
        f"""# Sample ASR language model (`{args.out.name}`)

Made by `python -m apps.asr.lm --order {args.order} --prune {" ".join(map(str, args.prune))}{
            f" --real-text {args.real_text}" if real else ""
        }`
from ../shared/data/text (LJ Speech sentences of LJ003 onwards, seven Project
Gutenberg novels, NLTK State of the Union and inaugural addresses; all public
domain), normalized to the acoustic model's vocabulary (a-z, apostrophe,
numbers spelled out). Sentences of the evaluation speech are excluded, and so
are the {len(left_out)} sentences the held-out voices of the acoustic model's
data speak, so that their score with this LM is on unseen text (the VQA
question forms, added on purpose, are the exception).{real_words}

- Estimation: interpolated modified Kneser-Ney, order {args.order}, pruning of
  n-grams with adjusted count <= {args.prune} per order (back-off renormalized).
- Training text: {len(train)} sentences, {words} words; vocabulary
  {sizes[0]} words.
- N-grams: {", ".join(f"{n}-grams {c}" for n, c in enumerate(sizes, 1))}; {mb:.1f} MB ARPA.
- Held out (1% of sentences by text hash, {len(heldout)} sentences, {tokens} tokens
  with </s>): perplexity **{ppl:.1f}**, OOV rate {oov:.2%}.
- Build time: {seconds:.0f} s on a 2-core machine.{binary_note}
"""
    )
    print(f"wrote {card}")


if __name__ == "__main__":
    main()
