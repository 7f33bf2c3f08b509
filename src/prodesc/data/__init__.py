"""The `data` stage: read a catalog, clean it, split it by family, write Parquet (`prepare`); a synthetic catalog
in the LF-Amazon line format (`synth`).

    prodesc data prepare trn.json.gz --out data/       # prodesc.data.prepare.prepare
    prodesc data synth --n 2000 --out catalog.json.gz  # prodesc.data.synth.synth

Inside: `readers` (formats, streams, Arrow/line JSON readers), `clean` (one record's text; the family key),
`columns` (the same cleaning over Arrow columns), `neardup` (MinHash signatures, LSH pairs, capped family merges),
`parallel` (worker pool, shared memory), word tables (*.yaml). Used by other stages: `overlap` (the leak guard:
train writes RUN_DIR/train_index.npz, eval and generate --data check items against it).
"""

from prodesc.data.overlap import check_overlap, data_settings, write_index

__all__ = ["check_overlap", "data_settings", "write_index"]
