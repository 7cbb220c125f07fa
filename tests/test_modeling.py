import json
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, GPT2Config, GPT2LMHeadModel

from conftest import run_script_outside_the_project
from modeling_scstclipcap import SCSTClipCapForCaptioning

MAPPING_TYPES = ["mlp", "transformer"]
EOS = 1


def make_model(make_config, seed=0, **overrides) -> SCSTClipCapForCaptioning:
    torch.manual_seed(seed)
    return SCSTClipCapForCaptioning(make_config(**overrides)).eval()


def caption_batch(batch_size=3, length=6, vocab_size=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    prefix_features = torch.randn(batch_size, 16, generator=generator)
    input_ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 4:] = 0  # the first caption is padded after 4 tokens
    input_ids[0, 4:] = 0
    return prefix_features, input_ids, attention_mask


@pytest.mark.parametrize("mapping_type", MAPPING_TYPES)
def test_forward_shapes_and_dtypes(make_config, mapping_type):
    model = make_model(make_config, mapping_type=mapping_type)
    prefix_features, input_ids, attention_mask = caption_batch()
    out = model(prefix_features=prefix_features, input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    assert out.logits.shape == (3, 4 + 6, 64)
    assert out.prefix_embeds.shape == (3, 4, 32)
    assert out.logits.dtype == torch.float32
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


@pytest.mark.parametrize("mapping_type", MAPPING_TYPES)
def test_loss_covers_caption_tokens_only(make_config, mapping_type):
    model = make_model(make_config, mapping_type=mapping_type)
    prefix_features, input_ids, attention_mask = caption_batch()
    out = model(prefix_features=prefix_features, input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)

    # Position P-1+t predicts caption token t; padded tokens are not targets.
    caption_logits = out.logits[:, 4 - 1 : -1]
    targets = input_ids.masked_fill(attention_mask == 0, -100)
    expected = F.cross_entropy(caption_logits.reshape(-1, 64), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)

    changed_ids = input_ids.clone()
    changed_ids[0, 5] = 17  # a padded position: neither a target nor attended to
    changed_labels = input_ids.clone()
    changed_labels[0, 4] = 23
    again = model(prefix_features=prefix_features, input_ids=changed_ids, attention_mask=attention_mask, labels=changed_labels)
    torch.testing.assert_close(again.loss, out.loss)


def argmax_loop(model, prefix_features, max_new_tokens):
    """Greedy decoding by hand: recompute the whole sequence each step, no cache."""
    embeds = model.map_prefix(prefix_features)
    tokens = torch.zeros(prefix_features.shape[0], 0, dtype=torch.long)
    finished = torch.zeros(prefix_features.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model.decoder(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        next_token = logits.argmax(-1).masked_fill(finished, 0)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        finished |= next_token == EOS
        embeds = torch.cat((embeds, model.decoder.get_input_embeddings()(next_token)[:, None]), dim=1)
        if finished.all():
            break
    return tokens


@pytest.mark.parametrize("mapping_type", MAPPING_TYPES)
def test_greedy_generate_equals_argmax_loop(make_config, mapping_type):
    model = make_model(make_config, mapping_type=mapping_type)
    # Make EOS likely after a few steps so that stopping and padding are exercised.
    with torch.no_grad():
        model.decoder.lm_head.weight[EOS] *= 4
    prefix_features = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    generated = model.generate(prefix_features, max_new_tokens=12, do_sample=False)
    expected = argmax_loop(model, prefix_features, 12)
    assert torch.equal(generated, expected)
    assert (generated == EOS).any(), "the test should cover captions that end early"


def test_generate_strategies(make_config):
    model = make_model(make_config)
    prefix_features = torch.randn(4, 16)
    beams = model.generate(prefix_features, max_new_tokens=7, num_beams=3)
    samples = model.generate(
        prefix_features, max_new_tokens=7, do_sample=True, temperature=0.7, top_k=10, top_p=0.9,
        num_return_sequences=5,
    )
    assert beams.shape[0] == 4 and beams.shape[1] <= 7
    assert samples.shape[0] == 20 and samples.shape[1] <= 7
    greedy = model.generate(prefix_features, max_new_tokens=7, do_sample=False)
    top1 = model.generate(prefix_features, max_new_tokens=7, do_sample=True, top_k=1)
    assert torch.equal(greedy, top1)
    beam_scores = model.generate(
        prefix_features, max_new_tokens=7, num_beams=3, return_dict_in_generate=True, output_scores=True
    ).sequences_scores
    assert beam_scores.shape == (4,)


def test_generate_feeds_one_token_per_step_through_the_cache(make_config):
    model = make_model(make_config)
    seen_lengths = []
    hook = model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen_lengths.append(
            (kwargs["inputs_embeds"] if kwargs.get("input_ids") is None else kwargs["input_ids"]).shape[1]
        ),
        with_kwargs=True,
    )
    model.generate(torch.randn(2, 16), max_new_tokens=6, do_sample=False, eos_token_id=None)
    hook.remove()
    assert seen_lengths == [4, 1, 1, 1, 1, 1]


def train_steps(model, steps=15, lr=1e-2):
    prefix_features, input_ids, attention_mask = caption_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(
            prefix_features=prefix_features, input_ids=input_ids, attention_mask=attention_mask, labels=input_ids
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mapping_type", MAPPING_TYPES)
@pytest.mark.parametrize("freeze_decoder", [False, True])
def test_training_lowers_the_loss(make_config, mapping_type, freeze_decoder):
    model = make_model(make_config, mapping_type=mapping_type, freeze_decoder=freeze_decoder)
    mapper_before = {k: v.clone() for k, v in model.mapper.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    losses = train_steps(model)
    # A frozen random GPT-2 limits how far the prefix alone can move the loss.
    assert losses[-1] < (losses[0] - 0.1 if freeze_decoder else 0.7 * losses[0])
    assert any(not torch.equal(v, model.mapper.state_dict()[k]) for k, v in mapper_before.items())
    decoder_unchanged = all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in decoder_before.items())
    assert decoder_unchanged == freeze_decoder
    if freeze_decoder:
        assert not model.decoder.training, "a frozen decoder keeps dropout off"


def test_normalize_prefix_ignores_feature_scale(make_config):
    model = make_model(make_config, normalize_prefix=True)
    prefix_features = torch.randn(2, 16)
    torch.testing.assert_close(model.map_prefix(prefix_features), model.map_prefix(3 * prefix_features))


def config_settings(config) -> dict:
    """The settings that define the model (loading adds its path, version and dtype)."""
    bookkeeping = ("_name_or_path", "transformers_version", "dtype")
    settings = {k: v for k, v in config.to_dict().items() if k not in bookkeeping}
    settings["decoder_config"] = {k: v for k, v in settings["decoder_config"].items() if k not in bookkeeping}
    return settings


def test_save_and_load_round_trip(make_config, tiny_tokenizer, tmp_path):
    model = make_model(make_config, mapping_type="transformer")
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = SCSTClipCapForCaptioning.from_pretrained(tmp_path).eval()
    assert config_settings(loaded.config) == config_settings(model.config)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.decoder.lm_head.weight.data_ptr() == loaded.decoder.transformer.wte.weight.data_ptr()
    prefix_features, input_ids, attention_mask = caption_batch()
    torch.testing.assert_close(
        loaded(prefix_features=prefix_features, input_ids=input_ids, attention_mask=attention_mask).logits,
        model(prefix_features=prefix_features, input_ids=input_ids, attention_mask=attention_mask).logits,
    )
    captions = loaded.generate_captions(prefix_features, max_new_tokens=5)
    token_ids = model.generate(prefix_features, max_new_tokens=5)
    assert captions == [c.strip() for c in tiny_tokenizer.batch_decode(token_ids, skip_special_tokens=True)]
    assert all(isinstance(caption, str) for caption in captions) and len(captions) == 3


def test_trainer_reloads_a_checkpoint_without_reporting_the_tied_head_missing(make_config, tmp_path):
    """Resume and load_best_model_at_end load `model.safetensors` with `load_state_dict(strict=False)`: the tied LM
    head, left out of the file, must not read as a missing key."""
    from transformers import Trainer, TrainingArguments
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    saved = make_model(make_config, seed=0)
    saved.save_pretrained(tmp_path / "checkpoint")
    model = make_model(make_config, seed=1)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[]))

    with CaptureLogger(transformers_logging.get_logger("transformers.trainer")) as captured:
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint"))

    assert "missing keys" not in captured.out
    for key, value in saved.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert model.decoder.lm_head.weight is model.decoder.transformer.wte.weight


def test_generation_with_finished_captions_does_not_ask_for_an_attention_mask(make_config):
    """Rows that ended early are fed padding; generate drops the all-ones mask it was given, so the model must not
    let GPT-2 take that padding for unmasked input (its 'strongly recommend passing an attention_mask' warning)."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    model = make_model(make_config)
    prefix_features = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    first_tokens = model.generate(prefix_features, max_new_tokens=1)[:, 0]
    assert len(set(first_tokens.tolist())) > 1, "some captions must end at once while others go on"
    settings = [dict(), dict(do_sample=True, num_return_sequences=2)]
    for generation_kwargs in settings:
        transformers_logging.get_logger("transformers.modeling_utils").warning_once.cache_clear()
        with CaptureLogger(transformers_logging.get_logger("transformers.modeling_utils")) as captured:
            captions = model.generate(prefix_features, max_new_tokens=4, eos_token_id=int(first_tokens[0]),
                                      **generation_kwargs)
        assert (captions == model.config.pad_token_id).any(), generation_kwargs
        assert "attention_mask" not in captured.out, generation_kwargs


def test_models_save_a_caption_length(make_config, tmp_path, recwarn):
    model = make_model(make_config)
    assert model.generation_config.max_new_tokens == 30
    model.save_pretrained(tmp_path)
    loaded = SCSTClipCapForCaptioning.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 30

    captions = loaded.generate(torch.randn(2, 16), min_new_tokens=30)

    assert captions.shape[1] == 30
    assert not [warning for warning in recwarn if "max_length" in str(warning.message)]
    short = make_model(make_config, decoder_config={**make_config().decoder_config.to_dict(), "n_positions": 20})
    assert short.generation_config.max_new_tokens == 20 - 4, "no longer than GPT-2's positions allow"


def test_caption_convenience_without_a_tokenizer_says_what_to_do(make_config):
    with pytest.raises(ValueError, match="pass tokenizer="):
        make_model(make_config).generate_captions(torch.randn(1, 16))


def test_from_decoder_pretrained_takes_gpt2_weights_from_a_folder(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    model = SCSTClipCapForCaptioning.from_decoder_pretrained(str(tmp_path / "gpt2"), prefix_dim=16, prefix_length=4)
    for key, value in gpt2.state_dict().items():
        assert torch.equal(value, model.decoder.state_dict()[key]), key
    assert model.config.decoder_config.n_embd == 32 and model.config.prefix_dim == 16


REMOTE_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModel
    folder = sys.argv[1]
    assert not any("configuration_scstclipcap" in name for name in sys.modules)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(inputs["prefix_features"], max_new_tokens=5)
    torch.save({"logits": logits, "generated": generated}, folder + "/remote_outputs.pt")
    print(json.dumps({"model_class": type(model).__name__, "module": type(model).__module__,
                      "config_class": type(config).__name__}))
    """
)


def test_saved_folder_loads_as_remote_code_in_a_fresh_process(make_config, tmp_path):
    model = make_model(make_config, mapping_type="transformer")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert {"configuration_scstclipcap.py", "modeling_scstclipcap.py"} <= set(os.listdir(folder))
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"].endswith(
        "SCSTClipCapForCaptioning"
    )
    prefix_features, input_ids, attention_mask = caption_batch()
    torch.save(dict(prefix_features=prefix_features, input_ids=input_ids, attention_mask=attention_mask), folder / "inputs.pt")
    report = run_script_outside_the_project(REMOTE_LOAD_SCRIPT, [folder], tmp_path)
    assert report["model_class"] == "SCSTClipCapForCaptioning"
    assert report["module"].startswith("transformers_modules"), "the class must come from the folder's own code"

    remote = torch.load(folder / "remote_outputs.pt")
    with torch.no_grad():
        expected = model(prefix_features=prefix_features, input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(remote["logits"], expected)
    assert torch.equal(remote["generated"], model.generate(prefix_features, max_new_tokens=5))


def test_auto_classes_load_the_folder_in_process(make_config, tmp_path):
    model = make_model(make_config)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(config).__name__ == "SCSTClipCapConfig" and config_settings(config) == config_settings(model.config)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "SCSTClipCapForCaptioning"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mapping_type="lstm"), "mapping_type='lstm' is not supported"),
        (dict(prefix_length=0), "prefix_length must be a positive integer"),
        (dict(prefix_dim=-3), "prefix_dim must be a positive integer"),
        (dict(prefix_length=64), "leaves no room for a caption"),
        (dict(mapping_type="transformer", num_mapping_heads=3), "must divide the decoder's hidden size 32"),
        (dict(mapping_type="transformer", clip_length=0), "needs clip_length >= 1"),
        (dict(decoder_config=dict(model_type="bert")), "must be a GPT-2 config"),
    ],
)
def test_invalid_configs_say_what_to_change(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_fsdp_auto_wrap_finds_every_no_split_module(make_config, mapping_type):
    from accelerate.utils.dataclasses import get_module_class_from_name

    model = SCSTClipCapForCaptioning(make_config(mapping_type=mapping_type))
    expected = {"GPT2Block"} | ({"MappingTransformerLayer"} if mapping_type == "transformer" else set())
    assert set(model._no_split_modules) == expected
    assert all(get_module_class_from_name(model, name) is not None for name in model._no_split_modules)
