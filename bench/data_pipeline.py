"""Data pipeline throughput: documents/s per core, herd vs datatrove on the shared stages.

    python bench/data_pipeline.py [--rounds 5] [--corpus data/builtin/documents.jsonl]

1. Stage by stage, side by side with datatrove (FineWeb's pipeline library) on the same
   documents, contenders interleaved within each round, medians compared:
   * MinHash signatures (word 5-grams, 128 hashes): herd (datasketch) vs datatrove's
     `MinhashDedupSignature` (sha1 shingles; its spaCy word tokenizer swapped for whitespace
     splitting so both see the same words);
   * Gopher repetition rules (top 2-4-gram and duplicated 5-10-gram fractions on the same word
     lists): herd's `repetition_reason` vs datatrove's `find_top_duplicate`/`find_all_duplicate`.
2. The whole pipeline (`herd data run`, configs/data/builtin.toml with the real Llama 3
   tokenizer) on the built-in corpus with 1 and 2 worker processes: documents/s per worker and
   MB/s per worker. datatrove has no single equivalent of the whole pipeline to run beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, machine  # noqa: E402


def load_docs(corpus: str | None) -> list[dict]:
    if corpus:
        return [json.loads(x) for x in Path(corpus).read_text().splitlines() if x.strip()]
    from herd.data.builtin import builtin_documents

    return [{"text": d.text, "domain": d.domain, "name": d.name} for d in builtin_documents()]


def stage_benches(docs: list[dict], rounds: int) -> None:
    from herd.data.dedup import minhash_signature
    from herd.data.filters import repetition_reason

    # a sample mixing both domains: every 4th document
    sample = [d["text"] for d in docs[::4]]
    n_docs, mb = len(sample), sum(len(t.encode()) for t in sample) / 1e6
    print(f"stage benches on {n_docs} documents ({mb:.1f} MB), {rounds} interleaved rounds, 1 process")

    contenders: dict[str, dict] = {}
    try:
        import datatrove.pipeline.dedup.minhash as dm
        from datatrove.pipeline.filters.gopher_repetition_filter import (
            find_all_duplicate,
            find_top_duplicate,
            get_n_grams,
        )
        from datatrove.utils.hashing import HashConfig

        class _Whitespace:
            def word_tokenize(self, text: str) -> list[str]:
                return text.split()

        dm.load_word_tokenizer = lambda language: _Whitespace()  # spaCy is not installed here
        sig = dm.MinhashDedupSignature(tempfile.mkdtemp(), dm.MinhashConfig(
            n_grams=5, num_buckets=16, hashes_per_bucket=8, hash_config=HashConfig(hash_fc="sha1", precision=64)))

        def dt_minhash():
            for t in sample:
                sig.get_signature(sig.get_shingles(t))

        top = [(2, 0.20), (3, 0.18), (4, 0.16)]
        dup = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]

        def dt_repetition():
            for t in sample:
                words = t.split()
                total = len("".join(words))
                for n, lim in top:
                    if find_top_duplicate(get_n_grams(words, n)) / total > lim:
                        break
                else:
                    for n, lim in dup:
                        if find_all_duplicate(words, n) / total > lim:
                            break

        contenders["minhash"] = {"datatrove": dt_minhash}
        contenders["repetition"] = {"datatrove": dt_repetition}
    except ImportError as e:
        print(f"  (datatrove not importable: {e}; herd's figures only)")
        top = [(2, 0.20), (3, 0.18), (4, 0.16)]
        dup = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
        contenders = {"minhash": {}, "repetition": {}}

    def herd_minhash():
        for t in sample:
            minhash_signature(t, 5, 128, 1)

    def herd_repetition():
        for t in sample:
            repetition_reason(t.split(), dup, top)

    contenders["minhash"]["herd"] = herd_minhash
    contenders["repetition"]["herd"] = herd_repetition
    for stage, fns in contenders.items():
        med = interleaved_medians(dict(sorted(fns.items())), rounds)
        line = ", ".join(f"{k} {n_docs / v:,.1f} docs/s ({mb / v:.2f} MB/s)" for k, v in sorted(med.items()))
        ratio = f"  → herd/datatrove {med['datatrove'] / med['herd']:.2f}×" if "datatrove" in med else ""
        print(f"  {stage:<11} {line}{ratio}")


def pipeline_bench(corpus_path: Path, n_docs: int, mb: float, workers_list: list[int]) -> None:
    from herd.data.pipeline import load_pipeline_config, run_pipeline

    config = Path(__file__).resolve().parent.parent / "configs" / "data" / "builtin.toml"
    print(f"whole pipeline, {config.name}, on {n_docs} documents ({mb:.1f} MB), llama3 tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        for workers in workers_list:
            cfg = load_pipeline_config(config, [f"--input.path={corpus_path}", f"--run.out={tmp}/out{workers}"])
            t = time.perf_counter()
            m = run_pipeline(cfg, workers=workers, restart=True)
            dt = time.perf_counter() - t
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in m["timing_s"].items() if k != "total")
            print(f"  {workers} worker(s): {dt:.1f} s → {n_docs / dt / workers:.2f} docs/s per worker, "
                  f"{mb / dt / workers:.2f} MB/s per worker ({phases})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--corpus", default=None, help="documents.jsonl (default: the built-in corpus)")
    ap.add_argument("--workers", default="1,2", help="worker counts for the whole-pipeline run")
    ap.add_argument("--skip-pipeline", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    docs = load_docs(a.corpus)
    print(f"{os.cpu_count()} cores, {machine()}; corpus: {len(docs)} documents")
    stage_benches(docs, a.rounds)
    if not a.skip_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(a.corpus) if a.corpus else Path(tmp) / "documents.jsonl"
            if not a.corpus:
                path.write_text("".join(json.dumps(d) + "\n" for d in docs))
            mb = path.stat().st_size / 1e6
            pipeline_bench(path, len(docs), mb, [int(w) for w in a.workers.split(",")])


if __name__ == "__main__":
    main()
