"""Data preparation: every data source to `datasets` Arrow tables of CLIP features and sentences.

Modules:
    common     -- what every step shares: run options, the requested CLIP, reuse of finished tables, the summary
    sources    -- readers of the raw sources, sentence cleaning and the skip report
    tables     -- streaming table writer (Arrow shards published with save_to_disk) and table reading
    images     -- the images tables (COCO / Flickr30k / shapes) and their COCO-format reference files
    corpus     -- sentence corpora and their seeded pretrain split
    neighbors  -- CLIP-agg targets and nearest-sentence pseudo pairs
    shapes     -- the offline shapes world: scenes, captions in two phrasing styles, rendering, its tokenizer
    world_clip -- the shapes world's tiny CLIP: its training recipes, validation figures and shipped weights
    world      -- the shapes world built and run through the same commands as real data

CLIP loading and feature extraction live in `clip_scstclipcap.py` (shipped with saved models); the shapes world's
language and grounding metric in `metrics/` (a metric does not depend on the code that makes its data).

The command line is `prepare_datasets.py` at the repository root.
"""
