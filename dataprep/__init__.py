"""Data preparation: every data source to `datasets` Arrow tables of CLIP features and sentences.

Modules:
    clip      -- open_clip loading, the CLIP metadata every table carries, batched feature extraction
    sources   -- readers of the raw sources, sentence cleaning and the skip report
    tables    -- streaming table writer (Arrow shards published with save_to_disk) and table reading
    images    -- the images tables (COCO / Flickr30k / shapes) and their COCO-format reference files
    corpus    -- sentence corpora and their seeded pretrain split
    neighbors -- CLIP-agg targets and nearest-sentence pseudo pairs
    world     -- the shapes world run through the same commands

The command line is `prepare_datasets.py` at the repository root.
"""
