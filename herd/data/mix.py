"""Domain tags and mixing weights (SPEC §3.1.2: the final mix is ≈ 50% general, 25% math and
reasoning, 17% code, 8% multilingual, chosen by token share).

Every document carries a domain tag (its JSONL `domain`, else its input's `domain`, else
"general"). `mix.weights` gives each domain's target share of the output *tokens*; a domain is
repeated (upsampled) or thinned (downsampled) by a factor f_d = w_d · T / T_d, where T_d is the
domain's tokens after filtering and T the total (so the output keeps the filtered size), or
scaled so that no domain repeats when `upsample = false`. A document's copy count is ⌊f⌋ plus one
more with probability frac(f), decided by a hash of its id: deterministic, so any worker count
and any resumed run make the same choice.
"""

from __future__ import annotations

import zlib

from herd.errors import HerdError


def mixing_factors(tokens_by_domain: dict[str, int], weights: dict[str, float], upsample: bool = True) -> dict[str, float]:
    """Copies per document of each domain. Empty `weights` = keep the natural mix (all 1)."""
    domains = sorted(d for d, t in tokens_by_domain.items() if t > 0)
    if not weights:
        return {d: 1.0 for d in domains}
    missing = [d for d in domains if d not in weights]
    if missing:
        raise HerdError(f"mix.weights has no weight for domain(s) {', '.join(missing)}; "
                        f"domains in the data: {', '.join(domains)}")
    bad = [d for d, w in weights.items() if w < 0]
    if bad or sum(weights[d] for d in domains) <= 0:
        raise HerdError("mix.weights must be non-negative with a positive sum over the data's domains")
    total = sum(tokens_by_domain[d] for d in domains)
    wsum = sum(weights[d] for d in domains)
    f = {d: weights[d] / wsum * total / tokens_by_domain[d] for d in domains}
    if not upsample:
        top = max(f.values())
        f = {d: v / top for d, v in f.items()}
    return f


def copies(doc_id: str, factor: float, seed: int = 0) -> int:
    whole = int(factor)
    u = zlib.crc32(f"mix:{seed}:{doc_id}".encode()) / 2**32
    return whole + (u < factor - whole)
