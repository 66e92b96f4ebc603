"""VQAScore (Lin et al., 2024; t2v_metrics): a local VLM's probability that the image shows a text.

For an image and a text the model gets one user turn, the image and the question
'Does this figure show "{text}"? Please answer yes or no.', through its chat template with
the generation prompt on; one forward pass gives the next-token distribution at the last
position, and the score is the probability of the answer's first token, "Yes".

How t2v_metrics defines the probability (its Qwen2-VL / Qwen2.5-VL wrapper): a softmax over
the whole vocabulary, then the entry of `tokenizer.encode("Yes")[0]`: "Yes" as the first
token of the answer, without a leading space (the answer follows "<|im_start|>assistant\\n";
Qwen's tokenizer has "Yes" and " Yes" as two different single tokens). No renormalisation
over yes and no: probability mass on "yes", "YES" or anything else counts against the score.
`VQASettings.normalize = "yes_no"` gives the renormalised P(Yes) / (P(Yes) + P(No)) as an
option. t2v_metrics reads the distribution from `generate(max_new_tokens=1, output_scores=
True)`, which passes the logits through the model's generation-config processors (none
change greedy logits for Qwen2.5-VL's config but a repetition penalty would); we take the
raw logits of one forward pass.

Columns (registry "vqa"):
    vqa_t  the text CLIP-T scores (the prompt as generated, minus identifiers and prefixes)
    vqa_r  a relation question built from the case (`relation_text`); NaN without a predicate

Images are resized to `image_size` x `image_size` (bicubic) before the processor, so the
number of image tokens, and the cost, is the same for every image (448: 256 tokens on
Qwen2.5-VL). Batches are left-padded so that the last position of every row is its own last
token. The tiny backbone builds a Qwen2.5-VL at toy size with seeded weights and an offline
tokenizer (`build_tiny_vqa`), whose numbers mean nothing but exercise every step.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from ..backbones import loading_from, seeded
from ..devices import dtype_name
from ..suites.model import find_phrase

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..backbones import Backbone
    from ..suites import Case
    from .registry import ImageItem

WEIGHT_KEY = "vqa"


@dataclass(frozen=True)
class VQASettings:
    # VQAScore's question (Lin et al., 2024, sec. 3; t2v_metrics' default template)
    question: str = 'Does this figure show "{text}"? Please answer yes or no.'
    answer: str = "Yes"  # its first token is the one scored (t2v_metrics' answer template)
    negative: str = "No"  # used by normalize="yes_no" only
    # "vocab": softmax over the whole vocabulary (t2v_metrics); "yes_no": P(Yes) / (P(Yes) + P(No))
    normalize: Literal["vocab", "yes_no"] = "vocab"
    image_size: int = 448  # square side the image is resized to before the processor (pixels)
    batch_size: int = 8  # (image, question) pairs per forward pass
    workers: int = 4  # threads preparing batches ahead of the model (resize, template, processor)


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def relation_text(case: "Case", predicate: str | None) -> str | None:
    """The text vqa_r asks about: who does what to whom, with class nouns and nothing else.

    agent: the subject whose class noun is the last one before the predicate in the prompt
    (subject 1 if none is). Object: in a multi-object case, the other subject when its class
    noun comes after the predicate: "a cat hugging a dog" (from "a cat hugging a dog on the
    beach"). Otherwise (single-object cases, and relations whose object is not a subject) the
    prompt's words after the predicate up to the first ",", "." or ";": "a sloth plushie
    hugging a tree". None without a predicate. A predicate not in the prompt gives
    "a {agent} {predicate}".
    """
    if predicate is None:
        return None
    prompt = case.prompt
    spans = case.class_spans()
    at = find_phrase(prompt, predicate)
    if at is None:
        return f"{_article(case.subjects[0].class_noun)} {predicate}"
    before = [k for k, (_, end) in enumerate(spans) if end <= at[0]]
    agent = max(before, key=lambda k: spans[k][1]) if before else 0
    after = [k for k, (start, _) in enumerate(spans) if k != agent and start >= at[1]]
    if after:
        obj = _article(case.subjects[min(after, key=lambda k: spans[k][0])].class_noun)
    else:
        obj = prompt[at[1]:]
        for stop in ",.;":
            obj = obj.split(stop)[0]
        obj = obj.strip()
    return " ".join(part for part in (_article(case.subjects[agent].class_noun), predicate, obj) if part)


class VQAScorer:
    """The `vqa` family scorer (registry.FamilyScorer): vqa_t and vqa_r per image."""

    family = "vqa"
    columns = ("vqa_t", "vqa_r")

    def __init__(self, model: Any, processor: Any, id: str, device: str = "cpu",
                 dtype: "torch.dtype | None" = None, settings: VQASettings = VQASettings()):
        import torch

        self.model, self.processor, self.id = model, processor, id
        # a fast tokenizer used from two threads at once can fail ("Already borrowed", it sets
        # its padding per call): the processor call is serialised, the resize is not
        self._processor_lock = threading.Lock()
        self.device, self.dtype, self.settings = device, dtype or torch.float32, settings
        processor.tokenizer.padding_side = "left"  # the last position must be each row's own last token
        self.answer_id = _first_token(processor.tokenizer, settings.answer)
        self.negative_id = _first_token(processor.tokenizer, settings.negative)

    def resize(self, image: "Image.Image") -> "Image.Image":
        """`image` at image_size x image_size (bicubic), the same object when it already is."""
        from PIL import Image

        side = self.settings.image_size
        return image if image.size == (side, side) else image.resize((side, side), Image.BICUBIC)

    def prepare(self, images: Sequence["Image.Image"], texts: Sequence[str]) -> dict[str, "torch.Tensor"]:
        """The model inputs of one batch: resized images, questions in the chat template, left-padded."""
        images = [self.resize(im) for im in images]
        prompts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": self.settings.question.format(text=t)}]}],
                tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
        with self._processor_lock:
            inputs = self.processor(text=prompts, images=images, padding=True, return_tensors="pt")
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    def forward(self, inputs: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Next-token logits at the last position, (N, vocab) float32."""
        import torch

        with torch.inference_mode():
            return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()

    def read_out(self, logits: "torch.Tensor") -> np.ndarray:
        """Last-position logits (N, vocab) -> P("Yes") (N,) float64 in [0, 1] (settings.normalize)."""
        probs = logits.softmax(dim=-1)
        yes = probs[:, self.answer_id]
        if self.settings.normalize == "yes_no":
            yes = yes / (yes + probs[:, self.negative_id])
        return yes.double().cpu().numpy()

    def yes_probability(self, images: Sequence["Image.Image"], texts: Sequence[str]) -> np.ndarray:
        """P("Yes") for each (image, text) pair, (N,), in one forward pass."""
        return self.read_out(self.forward(self.prepare(images, texts)))

    def score(self, items: Sequence["ImageItem"]) -> list[dict[str, float]]:
        """One row per item: vqa_t, vqa_r (NaN when the case has no predicate).

        The questions go in batches of settings.batch_size; `workers` threads prepare the next
        batches (resize, template, processor: the CPU's part; PIL's resize releases the GIL and
        runs in parallel, the processor one batch at a time) while the model runs this one, and
        each image is resized once for both of its questions.
        """
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        pairs = []
        for i, item in enumerate(items):
            pairs.append((i, "vqa_t", item.text))
            if (text := relation_text(item.case, item.predicate)) is not None:
                pairs.append((i, "vqa_r", text))
        size = self.settings.batch_size
        chunks = [pairs[start:start + size] for start in range(0, len(pairs), size)]
        resized: dict[int, "Image.Image"] = {}

        def image(i: int) -> "Image.Image":
            if i not in resized:
                resized[i] = self.resize(items[i].image)
            return resized[i]

        def prepare(chunk):
            return self.prepare([image(i) for i, _, _ in chunk], [text for _, _, text in chunk])

        rows = [dict.fromkeys(self.columns, math.nan) for _ in items]
        ahead = max(1, self.settings.workers)
        with ThreadPoolExecutor(max_workers=ahead) as pool:
            pending = deque(pool.submit(prepare, chunk) for chunk in chunks[:ahead])
            for k, chunk in enumerate(chunks):
                inputs = pending.popleft().result()
                if k + ahead < len(chunks):
                    pending.append(pool.submit(prepare, chunks[k + ahead]))
                for (i, column, _), p in zip(chunk, self.read_out(self.forward(inputs))):
                    rows[i][column] = float(p)
        return rows


def _first_token(tokenizer, text: str) -> int:
    """The id of `text`'s first token as the answer's first token (no special tokens added)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer encodes {text!r} to no tokens")
    return ids[0]


# ---- the model: real weights on sdxl, a seeded toy Qwen2.5-VL on tiny ----

_SEED_OFFSET = 41  # see backbones.seeded
_TINY_IMAGE_SIZE = 56  # 4 x 4 patches of 14 -> 4 image tokens after the 2 x 2 merge
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>")
# Qwen2.5-VL's chat format (a default system turn; an image part becomes the vision tokens)
_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VQA_TEXT = dict(  # Qwen2.5-VL-3B: hidden 2048, 36 layers, 16 heads, 2 kv heads
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=1024,
    rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),  # 3B: [16, 24, 24]
    initializer_range=0.5,  # 3B: 0.02; wide so that P(Yes) differs from image to image
)
TINY_VQA_VISION = dict(  # 3B: hidden 1280, depth 32, 16 heads; patch 14, merge 2, window 112 as here
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1],
    initializer_range=0.5,
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer in Qwen2's class, offline: the 256 byte symbols (so anything
    encodes), merges that make "Yes", "No", "yes", "no", " Yes" and " No" single tokens (as in
    Qwen's vocabulary), and the chat and vision special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []

    def merge(a: str, b: str) -> None:
        merges.append((a, b))
        vocab[a + b] = len(vocab)

    for word in ("Yes", "No", "yes", "no"):
        for k in range(1, len(word)):
            merge(word[:k], word[k])
    merge("\u0120", "Yes")  # "Ġ" is the byte-level space
    merge("\u0120", "No")
    vocab.update({s: len(vocab) + k for k, s in enumerate(_SPECIAL)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL[1:])})
    return tokenizer


def build_tiny_vqa(seed: int = 0):
    """(model, processor): Qwen2.5-VL at toy size with seeded weights and its processor, offline."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = build_tiny_tokenizer()
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in _SPECIAL}
    pixels = _TINY_IMAGE_SIZE**2
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=_CHAT_TEMPLATE)
    text = dict(TINY_VQA_TEXT, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(TINY_VQA_VISION, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return seeded(seed, _SEED_OFFSET, lambda: Qwen2_5_VLForConditionalGeneration(config)), processor


def vqa_id(backbone: "Backbone", dtype: "torch.dtype | None" = None) -> str:
    """A stable name for the VLM `load_vqa_scorer` loads, "@<dtype>" appended when not fp32 (the
    style of score.encoder_ids): "hf:Qwen/Qwen2.5-VL-3B-Instruct@bf16", "tiny:qwen2.5-vl-seed0"."""
    import torch

    if backbone.is_tiny:
        name = f"tiny:qwen2.5-vl-seed{backbone.preset.seed}"
    else:
        source = backbone.source(WEIGHT_KEY)
        name = f"local:{Path(source.location).name}" if source.kind == "local" else f"hf:{source.location}"
    dtype = dtype_name(dtype or torch.float32)
    return name if dtype == "fp32" else f"{name}@{dtype}"


def load_vqa_scorer(backbone: "Backbone", device: str = "cpu", dtype: "torch.dtype | None" = None,
                    settings: VQASettings = VQASettings()) -> VQAScorer:
    """The VQAScorer of `backbone`: weights `vqa` on sdxl (bfloat16 on a GPU, float32 on the
    CPU unless `dtype` says), the tiny Qwen2.5-VL on tiny (float32, its own image size).

    Raises UserError when the weights are missing (`Backbone.check_available`) or the folder
    holds no transformers image-text-to-text model.
    """
    import torch

    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" and not backbone.is_tiny else torch.float32
    if backbone.is_tiny:
        model, processor = build_tiny_vqa(backbone.preset.seed or 0)
        settings = replace(settings, image_size=_TINY_IMAGE_SIZE)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = backbone.fetch(WEIGHT_KEY)
        with loading_from(path, "an image-text-to-text model and its processor", "give a transformers "
                          "image-text-to-text model (e.g. Qwen/Qwen2.5-VL-3B-Instruct) with --weight vqa=PATH_OR_HUB_ID"):
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    model = model.to(device) if dtype == torch.float32 else model.to(device, dtype)
    return VQAScorer(model, processor, vqa_id(backbone, dtype), device, dtype, settings)
