"""Features: the on-disk store (store.py), the model that fills it (extractor.py), the
background shard writer (writer.py) and the batches of an in-memory set streamed to a GPU while
the model runs (staging.py). The job and its CLI are toolkit/extract.py; search and
evaluation over a store are toolkit/retrieve.py.

    from toolkit.features import load_features
    feats = load_features("runs/extract_resnet50/features")   # features (N, D), labels, paths, meta
"""

from toolkit.features.extractor import LAYERS_BUILTIN, Extractor, build_model, load_run_config
from toolkit.features.store import (META, SHARDS, Features, iter_shards, load_features, read_manifest, read_meta,
                                    read_shard, shard_marker, shard_name, shard_ranges, write_manifest, write_shard)
from toolkit.features.writer import ShardWriter

__all__ = ["LAYERS_BUILTIN", "META", "SHARDS", "Extractor", "Features", "ShardWriter", "build_model", "iter_shards",
           "load_features", "load_run_config", "read_manifest", "read_meta", "read_shard", "shard_marker",
           "shard_name", "shard_ranges", "write_manifest", "write_shard"]
