"""The data stage (DESIGN "data/"): token shards on disk and the packed, resumable loader.

The rest of SPEC §3's pipeline (extraction, de-duplication, filters, classifiers, mixing) lands
beside `shards.py`; everything ends as a shards directory that `herd pretrain` reads.
"""

from herd.data.shards import PackedBatch, PackedLoader, read_meta, shards_from_texts, write_shards

__all__ = ["PackedBatch", "PackedLoader", "read_meta", "shards_from_texts", "write_shards"]
