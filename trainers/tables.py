"""The tables a stage reads (from prepare_datasets.py): loaded, and checked to come from one CLIP that feeds the
model."""

from pathlib import Path

from datasets import load_from_disk

from clip_scstclipcap import (
    ClipMismatchError, check_clip_metadata, check_model_features, describe_clip, read_clip_metadata,
)
from configuration_scstclipcap import SCSTClipCapConfig


def check_table_exists(path: str, what: str):
    if not Path(path).exists():
        raise SystemExit(f"the {what} table {path} does not exist: make it with prepare_datasets.py")


def load_table(path: str | None, what: str):
    if path is None:
        raise SystemExit(f"this stage needs the {what} table: set it in the recipe or with --{what}_table")
    check_table_exists(path, what)
    return load_from_disk(path)


def check_tables_share_a_clip(tables: dict[str, str], model_config: SCSTClipCapConfig | None = None) -> dict:
    """All tables must come from one CLIP, and from the model's CLIP when the model already exists."""
    for name, path in tables.items():
        if path is not None:
            check_table_exists(path, name)
    metas = {name: read_clip_metadata(path) for name, path in tables.items() if path is not None}
    first_name, first = next(iter(metas.items()))
    for name, meta in metas.items():
        check_clip_metadata(meta, first, f"{name} table {tables[name]} (vs the {first_name} table)")
    if model_config is not None and first.get("dim") not in (None, model_config.prefix_dim):
        raise SystemExit(
            f"the tables hold {first['dim']}-d features of {describe_clip(first)}, but the model expects "
            f"prefix_dim={model_config.prefix_dim} from {model_config.clip_model_name}: use tables of the model's CLIP."
        )
    return first


def check_tables_feed_the_model(tables: dict[str, str | None], model_config: SCSTClipCapConfig, training: bool):
    """Every table's features can feed the model (its prefix_dim, and the CLIP embedding it reads: raw or
    normalised). The training stages feed the tables' normalised features as they are, so they refuse a model that
    reads raw embeddings (a converted ClipCap / CgT-GAN model: caption and evaluate it, or convert it with
    --normalize-prefix)."""
    if training and model_config.clip_embedding != "normalized":
        raise SystemExit(f"the model reads raw CLIP embeddings (clip_embedding={model_config.clip_embedding!r}) but "
                         "the training stages feed the tables' normalised ones: evaluate or caption with it, or "
                         "train a model that reads normalised embeddings")
    for name, path in tables.items():
        if path is not None:
            try:
                check_model_features(path, model_config, f"the {name} table {path}")
            except ClipMismatchError as error:
                raise SystemExit(str(error))
