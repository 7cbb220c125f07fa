"""Pieces both training stages use: caption batches, the MMD term, caption evaluation, and saving."""

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import broadcast_object_list, gather_object
from transformers import Trainer, TrainingArguments

from clip_scstclipcap import table_prefix_features
from metrics import compute_coco_metrics

from . import checkpoints


MMD_BANDWIDTHS = (0.5, 1.0, 2.0, 4.0)


@dataclass
class CaptionConfig(TrainingArguments):
    r"""What every training stage of a captioner shares (its MMD term, its evaluation by captioning); each stage's
    config adds its own settings. Everything else is [`~transformers.TrainingArguments`]."""

    # Optional MMD term
    mmd_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the MMD between mapped image prefixes and mapped text prefixes (init: of the "
                          "step's corpus sentences; scst: of the step's real sentences, which then need clip_features "
                          "in the corpus table). 0 turns it off.",
                  "aliases": ["--lambda2"]},
    )
    mmd_bandwidths: list[float] = field(
        default_factory=lambda: list(MMD_BANDWIDTHS),
        metadata={"help": "RBF bandwidths of the MMD kernel, as multiples of the median pairwise distance."},
    )

    # Evaluation by captioning the validation images
    eval_max_new_tokens: int = field(default=30, metadata={"help": "Caption length limit when evaluating."})
    eval_num_beams: int = field(default=1, metadata={"help": "Beams when evaluating (1: greedy)."})
    spice: bool = field(
        default=False,
        metadata={"help": "Also compute SPICE (Java; its Stanford models are fetched once, as pycocoevalcap does, "
                          "when they are missing)."},
    )

    # Trainer defaults that suit captioning stages
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the table columns the stage reads (text, CLIP features)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.mmd_weight < 0:
            raise ValueError(f"mmd_weight must be >= 0 (0 turns it off), got {self.mmd_weight}.")
        if not self.mmd_bandwidths or min(self.mmd_bandwidths) <= 0:
            raise ValueError(f"mmd_bandwidths must be positive numbers, got {self.mmd_bandwidths}.")
        check_caption_generation(self)


def check_caption_generation(config):
    """Refuse evaluation settings (of a [`CaptionConfig`] or the eval stage's config) that caption nothing."""
    if config.eval_num_beams < 1 or config.eval_max_new_tokens < 1:
        raise ValueError("eval_num_beams and eval_max_new_tokens must be >= 1.")


def pad_right(rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of token ids -> `input_ids` and `attention_mask`, padded after the tokens whatever the tokenizer's
    `padding_side`: a caption must follow its prefix directly, and the discriminator pools position 0."""
    input_ids = torch.full((len(rows), max(map(len, rows))), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, ids in enumerate(rows):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        attention_mask[index, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class CaptionCollator:
    """Rows with `text` and `clip_features` -> `prefix_features`, `input_ids` (caption + EOS), `attention_mask`.

    Other feature columns listed in `feature_columns` are stacked as they are; a text column `pair_text` becomes
    `pair_input_ids` / `pair_attention_mask`.
    """

    def __init__(self, tokenizer, max_length: int, feature_columns: dict[str, str] | None = None):
        if tokenizer.eos_token is None or tokenizer.pad_token_id is None:
            raise ValueError("The caption tokenizer needs an eos_token and a pad_token.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.feature_columns = {"clip_features": "prefix_features", **(feature_columns or {})}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        # Truncate the words first so that a long sentence still ends with EOS.
        encoded = self.tokenizer(
            list(texts), add_special_tokens=False, truncation=True, max_length=self.max_length - 1
        )["input_ids"]
        return pad_right([ids + [self.tokenizer.eos_token_id] for ids in encoded], self.tokenizer.pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenize([row["text"] for row in rows])
        if "pair_text" in rows[0]:
            pair = self.tokenize([row["pair_text"] for row in rows])
            batch.update(pair_input_ids=pair["input_ids"], pair_attention_mask=pair["attention_mask"])
        for column, name in self.feature_columns.items():
            if column in rows[0]:
                batch[name] = torch.stack([torch.as_tensor(row[column], dtype=torch.float32) for row in rows])
        return batch


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth_multipliers: tuple[float, ...]) -> torch.Tensor:
    """Squared maximum mean discrepancy between samples `x` (N, F) and `y` (M, F), biased estimate.

    The kernel is a sum of Gaussians exp(-d^2 / (2 s^2)) with s = multiplier * (median pairwise distance), the
    median taken over both samples without gradient, so the term adapts to the scale of the embeddings.
    """
    samples = torch.cat((x, y), dim=0).float()
    squared_distances = torch.cdist(samples, samples).pow(2)  # (N+M, N+M)
    off_diagonal = squared_distances[~torch.eye(len(samples), dtype=torch.bool, device=samples.device)]
    median = off_diagonal.detach().median().clamp_min(1e-12)
    kernel = sum(torch.exp(-squared_distances / (2 * m * m * median)) for m in bandwidth_multipliers)
    n = len(x)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


class CaptionEvaluator:
    """Captions a table of images and scores them against their references with the COCO toolkit.

    Args:
        images: rows with `image_id`, `clip_features` and `references`.
        tokenizer: the caption tokenizer.
        output_dir: where the predictions go, in the COCO results format (`predictions-step-N.json`).
        generation_kwargs: passed to `generate` (e.g. `max_new_tokens`, `num_beams`).
        batch_size: images per `generate` call.
        extra_metrics: callables `predictions {image_id: caption} -> {name: value}` (e.g. grounding, CLIP-S).
        spice: compute SPICE when its models are present.
    """

    def __init__(
        self,
        images,
        tokenizer,
        output_dir: str | Path,
        generation_kwargs: dict | None = None,
        batch_size: int = 64,
        extra_metrics: list[Callable[[dict[str, str]], dict]] | None = None,
        spice: bool = False,
    ):
        self.images = images
        self.image_ids = list(images["image_id"])
        self._features = {}
        self.references = dict(zip(self.image_ids, images["references"]))
        if not all(self.references.values()):
            missing = [image_id for image_id, refs in self.references.items() if not refs][:3]
            raise ValueError(f"Evaluation images need references; none for {missing} ...")
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir)
        self.generation_kwargs = generation_kwargs or {}
        self.batch_size = batch_size
        self.extra_metrics = extra_metrics or []
        self.spice = spice

    def prefix_features(self, config) -> torch.Tensor:
        """(N, D) the images' CLIP embeddings as a model with `config` reads them (raw or L2-normalised)."""
        embedding = getattr(config, "clip_embedding", "normalized")
        if embedding not in self._features:
            self._features[embedding] = table_prefix_features(self.images, config, what="evaluation images table")
        return self._features[embedding]

    @torch.no_grad()
    def caption(self, model, indices: list[int]) -> list[str]:
        features = self.prefix_features(model.config)
        captions = []
        for start in range(0, len(indices), self.batch_size):
            batch = features[indices[start : start + self.batch_size]]
            captions += model.generate_captions(batch, tokenizer=self.tokenizer, **self.generation_kwargs)
        return captions

    def __call__(self, model, accelerator, step: int) -> dict[str, float]:
        """Every process captions its share of the images; the main process scores all of them."""
        was_training = model.training
        model.eval()
        shard = list(range(accelerator.process_index, len(self.image_ids), accelerator.num_processes))
        # Under ZeRO-3 or FSDP every forward is collective, so every process runs as many batches: shorter shards
        # repeat an image, whose extra captions are dropped.
        per_process = -(-len(self.image_ids) // accelerator.num_processes)
        padded = shard + [shard[-1] if shard else 0] * (per_process - len(shard))
        captions = self.caption(model, padded)[: len(shard)]
        pairs = gather_object(list(zip([self.image_ids[i] for i in shard], captions)))
        model.train(was_training)
        metrics = [None]
        if accelerator.is_main_process:
            predictions = dict(pairs)
            metrics[0] = self.score(predictions)
            self.write_predictions(predictions, step)
        return broadcast_object_list(metrics)[0]

    def score(self, predictions: dict[str, str]) -> dict[str, float]:
        references = {image_id: self.references[image_id] for image_id in predictions}
        metrics = {
            name: value
            for name, value in compute_coco_metrics(predictions, references, spice=self.spice).items()
            if isinstance(value, (int, float))
        }
        for extra in self.extra_metrics:
            metrics.update(extra(predictions))
        metrics.update(caption_statistics(list(predictions.values())))
        return metrics

    def write_predictions(self, predictions: dict[str, str], step: int):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()]
        (self.output_dir / f"predictions-step-{step}.json").write_text(json.dumps(rows, indent=1))


def caption_statistics(captions: list[str]) -> dict[str, float]:
    """Length, diversity and degeneration signs of a set of captions."""
    words = [caption.split() for caption in captions]
    unigrams = [w for ws in words for w in ws]
    bigrams = [pair for ws in words for pair in zip(ws, ws[1:])]
    return {
        "caption_length": sum(map(len, words)) / max(len(words), 1),
        "distinct_1": len(set(unigrams)) / max(len(unigrams), 1),
        "distinct_2": len(set(bigrams)) / max(len(bigrams), 1),
        # The degenerate loop "stripes stripes": the same word twice in a row.
        "repeated_word_share": sum(any(a == b for a, b in zip(ws, ws[1:])) for ws in words) / max(len(words), 1),
        "distinct_caption_share": len(set(captions)) / max(len(captions), 1),
        "vocabulary_size": len(set(unigrams)),
    }


@contextlib.contextmanager
def own_class(model: torch.nn.Module):
    """`model` wears, inside the block, the class its code defines (the one registered for the Auto API by
    `register_for_auto_class`) instead of a wrapper's subclass of it, as FSDP2's `fully_shard` makes (`FSDP<Name>`,
    defined in torch)."""
    wrapper = type(model)
    registered = [cls for cls in wrapper.__mro__ if cls.__dict__.get("_auto_class") is not None]
    model.__class__ = registered[0] if registered else wrapper
    try:
        yield model
    finally:
        model.__class__ = wrapper


class CaptionTrainer(Trainer):
    """What every stage's trainer shares: per-step metrics averaged in `log()`, evaluation by captioning, saved
    folders that carry the model's own code, and crash-safe checkpoints ([`trainers.checkpoints`]): a checkpoint
    counts once complete, `train(resume_from_checkpoint="latest")` (or `True`) resumes from the newest complete one,
    and an incomplete one is refused.

    Subclasses append per-step values to `self._metrics[name]` and set `self.evaluator` (a [`CaptionEvaluator`], or
    `None` to skip evaluation); their config is a [`CaptionConfig`].
    """

    _save_checkpoint = checkpoints.crash_safe(Trainer._save_checkpoint)

    def __init_subclass__(cls, **kwargs):
        # A stage's own `_save_checkpoint` (scst's writes the discriminator, then calls the Trainer's) is wrapped
        # whole, so that the completion marker follows everything it writes.
        super().__init_subclass__(**kwargs)
        if "_save_checkpoint" in vars(cls):
            cls._save_checkpoint = checkpoints.crash_safe(vars(cls)["_save_checkpoint"])

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """[`~transformers.Trainer.train`], where `resume_from_checkpoint` is `"latest"` or `True` (the newest
        complete checkpoint of the output folder, or none: from the beginning) or the path of a complete checkpoint.
        The checkpoints of the output folder after the starting step are removed first: this run writes over them."""
        run_dir = self._get_output_dir(trial=trial)
        checkpoint = checkpoints.resolve_resume(resume_from_checkpoint, run_dir)
        if self.args.should_save:
            checkpoints.retire_checkpoints_after(run_dir, checkpoints.saved_step(checkpoint))
        self.accelerator.wait_for_everyone()
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({name: sum(values) / len(values) for name, values in self._metrics.items() if values})
            self._metrics.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """COCO metrics of greedy (or beam) captions of the validation images."""
        if self.evaluator is None:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        self.evaluator.generation_kwargs.setdefault("max_new_tokens", self.args.eval_max_new_tokens)
        self.evaluator.generation_kwargs.setdefault("num_beams", self.args.eval_num_beams)
        raw = self.evaluator(model, self.accelerator, self.state.global_step)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in raw.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        if self.is_in_train and self.state.global_step == 0:
            self.save_starting_point(metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        # `save_pretrained` copies the file of the instance's class into the folder and names that class in `auto_map`:
        # under FSDP2 it would be torch's FSDP code (the weights are the gathered `state_dict` either way).
        with own_class(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)

    def save_starting_point(self, metrics: dict[str, float]):
        """Let the model a stage starts from compete for the best checkpoint (evaluated at step 0 by
        `eval_on_start`): it is saved as `checkpoint-0` and holds the best metric until a later checkpoint beats it,
        so a stage that does not improve on validation hands back the model it started from."""
        if self.args.metric_for_best_model is None or self.args.save_strategy == "no":
            return
        self._determine_best_metric(metrics, trial=None)
        # Set before saving, so that the checkpoint's own trainer state names it and rotation keeps it; the Trainer
        # only records best checkpoints of steps > 0 itself.
        self.state.best_model_checkpoint = str(Path(self._get_output_dir(trial=None)) / "checkpoint-0")
        self._save_checkpoint(self.model_wrapped, trial=None)
