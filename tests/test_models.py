import json

import pytest
import torch

from ospo_fast.models import ModelLoadError, load_janus
from ospo_fast.models.factory import build_offline_model, sizes_for


def _image_inputs(bundle, prompts):
    texts = [bundle.processor.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             for p in prompts]
    return bundle.processor(text=texts, generation_mode="image", return_tensors="pt", padding=True)


def test_saved_tiny_model_reloads_and_generates_an_image(tmp_path):
    out = build_offline_model("tiny", tmp_path / "tiny", grid=8)
    bundle = load_janus(str(out), device="cpu")
    assert bundle.grid == 8 and bundle.num_image_tokens == 64 and bundle.num_layers == 12
    inputs = _image_inputs(bundle, ["a red circle", "a blue square to the left of a green cat"])
    # the unconditional row keeps BOS and <begin_of_image>: both ids must be known to the generation config
    assert bundle.model.generation_config.generation_kwargs["boi_token_id"] == inputs.input_ids[0, -1].item()
    tokens = bundle.model.generate(**inputs, generation_mode="image", do_sample=False)
    assert tokens.shape == (2, 64) and int(tokens.max()) < bundle.model.config.vq_config.num_embeddings
    pixels = bundle.model.decode_image_tokens(tokens)
    assert pixels.shape == (2, 128, 128, 3) and torch.isfinite(pixels).all()


def test_tiny_model_answers_a_text_prompt(tiny_bundle):
    text = tiny_bundle.processor.apply_chat_template([{"role": "user", "content": "Is there a cat?"}],
                                                     add_generation_prompt=True)
    inputs = tiny_bundle.processor(text=[text], return_tensors="pt")
    out = tiny_bundle.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs.input_ids.shape[1] + 4)
    assert isinstance(tiny_bundle.tokenizer.decode(out[0, inputs.input_ids.shape[1]:]), str)


def test_tiny_understands_an_image(tiny_bundle):
    from PIL import Image

    text = tiny_bundle.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a cat?"}]}],
        add_generation_prompt=True)
    inputs = tiny_bundle.processor(text=[text], images=[Image.new("RGB", (90, 60), "red")], return_tensors="pt")
    assert (inputs.input_ids == tiny_bundle.model.config.image_token_id).sum() == 64
    with torch.no_grad():
        logits = tiny_bundle.model(**inputs).logits
    assert logits.shape[:2] == inputs.input_ids.shape and torch.isfinite(logits).all()


def test_grid_24_matches_janus_pro_token_count(tmp_path):
    bundle = load_janus(str(build_offline_model("tiny", tmp_path / "t24", grid=24)), device="cpu")
    assert bundle.num_image_tokens == 576 and bundle.grid == 24


@pytest.mark.parametrize("kind, layers, hidden", [("janus-pro-1b-shape", 24, 2048), ("janus-pro-7b-shape", 30, 4096)])
def test_published_shapes(kind, layers, hidden):
    sizes = sizes_for(kind)
    assert (sizes.layers, sizes.hidden, sizes.grid, sizes.codebook) == (layers, hidden, 24, 16384)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_janus(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_janus(str(tmp_path))


def test_directory_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not a Janus"):
        load_janus(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_janus("builtin:tiny", dtype="float8")


@pytest.mark.parametrize("name, text, words", [
    ("config.json", '{"model_type": "janus", ', ["config.json is not valid JSON", "line 1 column", "copy it again"]),
    ("config.json", '["janus"]', ["config.json holds a JSON list", "copy it again"]),
    ("processor_config.json", '{"num_image_tokens": 5', ["processor_config.json is not valid JSON", "line 1"]),
])
def test_damaged_json_names_the_file(tmp_path, name, text, words):
    """A cut-off or damaged JSON file of a checkpoint is a one-line error naming it (was a raw JSONDecodeError)."""
    (tmp_path / "config.json").write_text('{"model_type": "janus"}')
    (tmp_path / name).write_text(text)
    with pytest.raises(ModelLoadError) as err:
        load_janus(str(tmp_path))
    assert str(tmp_path / name) in str(err.value)
    for word in words:
        assert word in str(err.value)
