"""Llama 4 vision: the encoder + multimodal merge against transformers' Llama4ForConditionalGeneration
(fp32, random weights, a real photo), the preprocessing and prompt expansion against Meta's
llama-models reference and transformers' processor, the HF mapping of the vision tower, and the
errors (SPEC §1, issue 6)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from herd.checkpoint.hf_llama4 import (
    hf_config_from_llama4_args,
    read_hf_llama4,
    to_hf_llama4_state_dict,
    write_hf_llama4,
)
from herd.errors import HerdError
from herd.models.image_processing import (
    best_canvas,
    encode_with_image,
    image_token_ids,
    load_image,
    prepare_image_prompt,
    preprocess_image,
    supported_canvases,
)
from herd.models.llama4 import Llama4Args, Transformer, VisionArgs
from herd.models.vision import Llama4Multimodal, WithImages

llama_models = pytest.importorskip("llama_models")
RESOURCES = Path(llama_models.__file__).parent / "resources"
DOG, PASTA = RESOURCES / "dog.jpg", RESOURCES / "pasta.jpeg"

# A small model whose <|patch|> id is the real one (200092), so prompts from the real Llama 4
# tokenizer drive it: the vocabulary must reach past the tokenizer's specials.
VISION = VisionArgs(image_size=56, patch_size=14, dim=32, n_layers=2, n_heads=2, output_dim=48, max_tiles=4)
ARGS = Llama4Args(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=202048, n_experts=4,
                  moe_ffn_dim=32, ffn_hidden_dim=48, max_seq_len=512, attention_chunk_size=8, floor_scale=4.0,
                  vision=VISION)


@pytest.fixture(scope="module")
def models():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(0)
    model = Llama4Multimodal(ARGS)
    model.init_weights(std=0.3)
    cfg = {k: v for k, v in hf_config_from_llama4_args(ARGS).items() if k != "architectures"}
    ref = Llama4ForConditionalGeneration(Llama4Config(**cfg))
    for c in (ref.config, ref.config.text_config, ref.config.vision_config):
        c._attn_implementation = "eager"
    missing, unexpected = ref.load_state_dict(to_hf_llama4_state_dict(model.state_dict(), ARGS), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval(), ref.eval()


@pytest.fixture(scope="module")
def tokenizer():
    from herd.tokenizer import load_tokenizer

    return load_tokenizer("llama4")


def hf_logits(ref, tokens, tiles):
    """Llama4ForConditionalGeneration.forward's own steps (its return path breaks in this
    transformers release: MoeCausalLMOutputWithPast has no image_outputs)."""
    emb = ref.get_input_embeddings()(tokens)
    feats = ref.vision_model(tiles).last_hidden_state
    proj = ref.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    emb = emb.masked_scatter(ref.get_placeholder_mask(tokens, inputs_embeds=emb, image_features=proj), proj)
    return ref.language_model(inputs_embeds=emb).logits


def test_multimodal_logits_match_transformers_on_a_real_photo(models, tokenizer):
    model, ref = models
    ids, tiles = prepare_image_prompt(model, tokenizer, [{"role": "user", "content": "What is in this picture?"}],
                                      DOG)
    assert tiles.shape[0] > 1  # several tiles plus the thumbnail: the tiling path is exercised
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs, text_only = model(tokens, images=tiles), hf_logits(ref, tokens, tiles), model(tokens)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - text_only).abs().max().item() > 1e-2  # the image really changes the answer


def test_generation_with_image_decodes_like_the_full_forward(models, tokenizer):
    from herd.inference.generate import generate_batch

    model, _ = models
    ids, tiles = prepare_image_prompt(model, tokenizer, "A photo of", PASTA)
    out = generate_batch(WithImages(model, tiles), [ids], max_new_tokens=4)[0].ids
    seq = torch.tensor([ids + out])
    with torch.no_grad():
        full = model(seq, images=tiles)[0, len(ids) - 1:-1].argmax(-1).tolist()
    assert out == full


# ---- preprocessing against Meta's reference -----------------------------------------------------
def _reference_with_pil_torchvision(monkeypatch):
    """Import llama-models' llama4 preprocessing and chat format. They import torchvision only for
    ToTensor, Normalize and resizing a PIL image; torchvision cannot load here (its wheel links a
    CUDA torch), so those four are given their documented PIL behaviour (torchvision's PIL path is
    `Image.resize((w, h), BILINEAR)`); the tiling, canvas choice, padding, splitting, thumbnail and
    prompt tokens all run as Meta wrote them."""
    from PIL import Image

    def resize(img, size, interpolation=None):
        return img.resize((size[1], size[0]), Image.BILINEAR)

    def to_tensor(img):
        return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0

    class Normalize:
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

        def __call__(self, x):
            return (x - self.mean) / self.std

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = resize
    transforms.functional = functional
    transforms.ToTensor = lambda: to_tensor
    transforms.Normalize = Normalize
    transforms.Resize = lambda size: (lambda img: resize(img, size))
    transforms.Compose = lambda fs: (lambda x: [x := f(x) for f in fs][-1])
    transforms.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear")
    tv.transforms = transforms
    for name, mod in (("torchvision", tv), ("torchvision.transforms", transforms),
                      ("torchvision.transforms.functional", functional)):
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("llama_models.llama4.preprocess", "llama_models.llama4.chat_format"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from llama_models.llama4 import chat_format, preprocess

    return chat_format, preprocess


def test_canvas_choice_matches_meta_reference(monkeypatch):
    _, preprocess = _reference_with_pil_torchvision(monkeypatch)
    ref = preprocess.VariableSizeImageTransform(336)
    for max_tiles in (1, 4, 16):
        canvases = supported_canvases(max_tiles, 336)
        assert canvases == ref.find_supported_resolutions(max_tiles, 336)
        g = torch.Generator().manual_seed(max_tiles)
        for w, h in torch.randint(20, 3000, (150, 2), generator=g).tolist() + [[336, 336], [672, 336], [100, 5000]]:
            assert best_canvas((w, h), canvases) == ref.get_best_fit((w, h), torch.tensor(canvases))


@pytest.mark.parametrize("path", [DOG, PASTA])
def test_tiles_and_prompt_match_meta_reference(monkeypatch, tokenizer, path):
    chat_format, _ = _reference_with_pil_torchvision(monkeypatch)
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama4.args import Size
    from llama_models.llama4.args import VisionArgs as MetaVisionArgs
    from llama_models.llama4.tokenizer import Tokenizer

    vision = VisionArgs()  # the released shapes: 336-pixel tiles, 14-pixel patches, up to 16 tiles
    meta_vision = MetaVisionArgs(image_size=Size(height=336, width=336), patch_size=Size(height=14, width=14),
                                 dim=1408, n_layers=1, n_heads=16, mlp_ratio=4.0, output_dim=4096,
                                 pixel_shuffle_ratio=0.5)
    fmt = chat_format.ChatFormat(Tokenizer.get_instance(), vision_args=meta_vision, max_num_chunks=vision.max_tiles)
    text = "Describe this image in two sentences."
    system = [] if path == DOG else [{"role": "system", "content": "Answer briefly."}]  # with a system turn too
    ref = fmt.encode_dialog_prompt([RawMessage(**m) for m in system] + [RawMessage(
        role="user", content=[RawMediaItem(data=path.read_bytes()), RawTextItem(text=text)])])
    processed = preprocess_image(load_image(path), vision)
    ids = encode_with_image(tokenizer, system + [{"role": "user", "content": text}],
                            image_token_ids(processed.grid, vision, tokenizer.special_tokens))
    assert ids == ref.tokens
    (ref_tiles,) = ref.images
    assert processed.tiles.shape == ref_tiles.shape and processed.tiles.shape[0] > 1
    assert (processed.tiles - ref_tiles).abs().max().item() <= 1e-6


def _meta_chat_format(monkeypatch, vision):
    chat_format, _ = _reference_with_pil_torchvision(monkeypatch)
    from llama_models.llama4.args import Size
    from llama_models.llama4.args import VisionArgs as MetaVisionArgs
    from llama_models.llama4.tokenizer import Tokenizer

    meta_vision = MetaVisionArgs(image_size=Size(height=vision.image_size, width=vision.image_size),
                                 patch_size=Size(height=vision.patch_size, width=vision.patch_size),
                                 dim=1408, n_layers=1, n_heads=16, mlp_ratio=4.0, output_dim=4096,
                                 pixel_shuffle_ratio=vision.pixel_shuffle_ratio)
    return chat_format.ChatFormat(Tokenizer.get_instance(), vision_args=meta_vision, max_num_chunks=vision.max_tiles)


@pytest.mark.parametrize("layout", ["images_first", "interleaved"])
def test_two_images_in_one_turn_match_meta_reference(monkeypatch, tokenizer, layout):
    """Two real photos in one user turn: herd's ids and tiles equal llama-models'
    `ChatFormat.encode_dialog_prompt`, which puts each image's run where it stands in the content."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem

    from herd.models.image_processing import prepare_images_prompt

    vision = VisionArgs()
    fmt = _meta_chat_format(monkeypatch, vision)
    if layout == "images_first":
        parts = [DOG, PASTA, "Which of these two would you rather eat?"]
    else:
        parts = ["First this one:", DOG, " then this one:", PASTA, " — what do they have in common?"]
    ref = fmt.encode_dialog_prompt([
        RawMessage(role="system", content="Answer briefly."),
        RawMessage(role="user", content=[RawMediaItem(data=p.read_bytes()) if isinstance(p, Path) else
                                         RawTextItem(text=p) for p in parts])])
    dialog = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": [{"type": "image", "image": p} if isinstance(p, Path) else
                                           {"type": "text", "text": p} for p in parts]}]
    model = types.SimpleNamespace(args=types.SimpleNamespace(vision=vision))
    ours = prepare_images_prompt(model, tokenizer, dialog)
    assert ours.ids == ref.tokens
    assert len(ref.images) == 2 and ours.tiles.shape[0] == sum(t.shape[0] for t in ref.images)
    assert (ours.tiles - torch.cat(ref.images)).abs().max().item() <= 1e-6
    # The same images given beside a plain dialog go first in the turn, as in the first layout.
    if layout == "images_first":
        plain = [dialog[0], {"role": "user", "content": parts[2]}]
        assert prepare_images_prompt(model, tokenizer, plain, [DOG, PASTA]).ids == ref.tokens
        slots = [dialog[0], {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                          {"type": "text", "text": parts[2]}]}]
        assert prepare_images_prompt(model, tokenizer, slots, [DOG, PASTA]).ids == ref.tokens


def test_two_images_in_a_text_prompt_match_meta_reference(monkeypatch, tokenizer):
    """A plain-text prompt: BOS, the images, the text — Meta's `encode_content([img, img, text])`."""
    from llama_models.datatypes import RawMediaItem, RawTextItem

    from herd.models.image_processing import prepare_images_prompt

    vision = VisionArgs()
    fmt = _meta_chat_format(monkeypatch, vision)
    ref = fmt.encode_content([RawMediaItem(data=DOG.read_bytes()), RawMediaItem(data=PASTA.read_bytes()),
                              RawTextItem(text="Two photos:")])
    model = types.SimpleNamespace(args=types.SimpleNamespace(vision=vision))
    assert prepare_images_prompt(model, tokenizer, "Two photos:", [DOG, PASTA]).ids == ref.tokens


def test_prompt_expansion_matches_transformers_processor(tokenizer):
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    v = VisionArgs()
    for grid in [(1, 1), (1, 3), (2, 2), (4, 1)]:
        text = Llama4Processor._prompt_split_image(None, grid, v.tokens_per_tile)
        assert image_token_ids(grid, v, tokenizer.special_tokens) == tokenizer.encode(text, allow_special=True)


def _synthetic(w: int, h: int, seed: int):
    """Gradients plus noise: noise is where two bilinear implementations disagree most."""
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 7 % 256], -1)
    noise = np.random.default_rng(seed).integers(-40, 40, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def test_preprocessing_matches_transformers_image_processor(tmp_path, tokenizer):
    """herd's tiles, tile grid and expanded prompt against transformers' torchvision-based Llama 4
    image processor and Llama4Processor (run where torchvision imports: the CUDA torch wheel's venv).

    The grids and token ids must be equal. Pixels may differ by two things only: torchvision's
    uint8 antialiased bilinear resize rounds a few pixels one level away from PIL's (herd follows
    Meta's llama-models, which resizes the PIL image through PIL), and transformers rescales and
    normalizes in bfloat16 (|error| < 2^-8) where Meta and herd use float32. Bound: 2/255 + 2^-8."""
    pytest.importorskip("torchvision")
    import transformers
    from transformers import AutoTokenizer, Llama4Processor

    from herd.models.image_processing import prepare_images_prompt

    processor_cls = getattr(transformers, "Llama4ImageProcessor", None) or transformers.Llama4ImageProcessorFast
    hf = processor_cls()
    tokenizer.save(tmp_path / "tok")
    processor = Llama4Processor(image_processor=hf, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tok"))
    vision = VisionArgs()  # 336-pixel tiles, up to 16: transformers' defaults
    model = types.SimpleNamespace(args=types.SimpleNamespace(vision=vision))
    images = {"dog": load_image(DOG), "pasta": load_image(PASTA), "tall": _synthetic(200, 1500, 0),
              "wide": _synthetic(1800, 150, 1), "tiny": _synthetic(20, 12, 2), "huge": _synthetic(4000, 3000, 3),
              "odd": _synthetic(337, 673, 4)}
    for name, img in images.items():
        ref = hf(images=[img], return_tensors="pt")
        ours = preprocess_image(img, vision)
        assert ours.grid == tuple(ref["aspect_ratios"][0].tolist()), name
        assert ours.tiles.shape == ref["pixel_values"].shape, name
        diff = (ours.tiles - ref["pixel_values"].float()).abs()
        assert diff.max().item() <= 2 / 255 + 2 ** -8 + 1e-6, (name, diff.max().item())
        assert diff.mean().item() <= 2e-3, (name, diff.mean().item())  # most pixels: the bf16 rounding only
        ids = processor(text="<|image|>What is this?", images=[img], return_tensors="pt")["input_ids"][0].tolist()
        assert prepare_images_prompt(model, tokenizer, "What is this?", [img]).ids == ids, name
    # two images in one prompt, each expanded where its <|image|> stands
    two = processor(text="<|image|><|image|>Which one is food?", images=[images["dog"], images["pasta"]],
                    return_tensors="pt")["input_ids"][0].tolist()
    assert prepare_images_prompt(model, tokenizer, "Which one is food?", [DOG, PASTA]).ids == two


# ---- checkpoints and errors ---------------------------------------------------------------------
def test_hf_round_trip_with_vision(models, tmp_path, tokenizer):
    from transformers import Llama4ForConditionalGeneration

    model, _ = models
    write_hf_llama4(tmp_path / "hf", ARGS, model.state_dict())
    ref = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    args, sd, _ = read_hf_llama4(tmp_path / "hf")
    assert args == ARGS
    back = Llama4Multimodal(args).eval()
    back.load_state_dict(sd)
    ids, tiles = prepare_image_prompt(model, tokenizer, "Hi", DOG)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours = model(tokens, images=tiles)
        assert torch.equal(back(tokens, images=tiles), ours)
        assert (hf_logits(ref, tokens, tiles) - ours).abs().max().item() <= 1e-4


def test_image_errors(models, tokenizer, tmp_path):
    model, _ = models
    text_only = Transformer(ARGS.replace(vision=None))
    with pytest.raises(HerdError, match="text-only"):
        prepare_image_prompt(text_only, tokenizer, "Hi", DOG)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(HerdError, match="not an image file"):
        load_image(bad)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(DOG.read_bytes()[:2000])
    with pytest.raises(HerdError, match="unreadable or truncated"):
        load_image(truncated)
    ids, tiles = prepare_image_prompt(model, tokenizer, "Hi", DOG)
    with pytest.raises(HerdError, match="<\\|patch\\|> tokens"):
        model(torch.tensor([ids]), images=tiles[:1])
    with pytest.raises(HerdError, match="tiles must have shape"):
        model(torch.tensor([ids]), images=torch.zeros(tiles.shape[0], 3, 48, 48))


def test_vision_parameter_count_equals_transformers():
    """The released vision tower's size (counted in Scout's and Maverick's published totals)."""
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionModel

    from herd.models.vision import VisionEmbeddings

    v = VisionArgs()
    with torch.device("meta"):
        ref = Llama4VisionModel(Llama4VisionConfig(
            hidden_size=v.dim, num_hidden_layers=v.n_layers, num_attention_heads=v.n_heads,
            intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch_size,
            vision_output_dim=v.output_dim, projector_input_dim=v.output_dim, projector_output_dim=v.output_dim))
        ours = VisionEmbeddings(v)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_ref == 850_960_896
    assert v.num_params(text_dim=5120) == n_ref + v.output_dim * 5120  # + the projector into the text model
